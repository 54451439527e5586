"""The README's main job: steer SmolLM2-135M-Instruct away from insults and measure it.

    lineas-fast demo [--steps 100] [--out lineas_demo]    (the command: ``lineas_fast.cli.demo``)

Trains LinEAS (Adam, lr 3e-3, 100 steps, sparse group lasso γ = 0.3) with 384 insults (source)
and 384 non-insults (target) from the Kaggle insults training file on the post-attention norms,
then for held-out prompts (the first words of insults from the test file) generates
continuations at each strength λ (and with the Linear-AcT baseline) and reports the toxicity
rate and mean probability of the continuations (alt-profanity-check), the perplexity on
Wikipedia extracts, the support and the training time; then fits per-token DSAS gates (insults
vs. held-out non-insult comments) and evaluates the gated steering at ``gate_strength`` (3).
Writes ``results.json``, ``plot.png`` and ``steering.safetensors`` into the output folder.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lineas_fast.apps.assets import read_insults, wikipedia_extracts
from lineas_fast.apps.eval import continuations, perplexity, toxicity
from lineas_fast.atomic import atomic_path
from lineas_fast.extras import pyplot
from lineas_fast.training.gates import fit_gates, gate_openings
from lineas_fast.training.linear_act import fit_linear_act
from lineas_fast.training.trainer import train


@dataclass
class DemoData:
    source: list  # insults (steer away from)
    target: list  # non-insults (steer toward)
    prompts: list  # held-out: first words of test-set insults
    wiki: list  # perplexity texts
    control: list = None  # neutral sentences for DSAS gates (non-insults, not in target)


def draw_demo_sentences(n_train: int = 32, n_prompts: int = 100, prompt_words: int = 5, seed: int = 0):
    """The demo's seeded draws from the insults data, in order: (held-out prompts: the first
    ``prompt_words`` words of test-set insults; ``n_train`` training insults; a pool of
    3·``n_train`` non-insults; the random.Random that drew them, for any later draw)."""
    rng = random.Random(seed)
    train_rows = [(y, t) for y, t in read_insults("train") if 20 <= len(t) <= 200]
    insults = [t for y, t in train_rows if y == 1]
    clean = [t for y, t in train_rows if y == 0]
    test_insults = [
        t for y, t in read_insults("test_with_solutions") if y == 1 and len(t.split()) > prompt_words
    ]
    prompts = [" ".join(t.split()[:prompt_words]) for t in rng.sample(test_insults, n_prompts)]
    source = rng.sample(insults, n_train)
    pool = rng.sample(clean, 3 * n_train)
    return prompts, source, pool, rng


def load_demo_data(
    n_train: int = 384, n_prompts: int = 100, n_wiki: int = 50, prompt_words: int = 5, seed: int = 0
) -> DemoData:
    prompts, source, pool, rng = draw_demo_sentences(n_train, n_prompts, prompt_words, seed)
    wiki = wikipedia_extracts()
    return DemoData(
        source, pool[:n_train], prompts, rng.sample(wiki, min(n_wiki, len(wiki))), control=pool[n_train:]
    )


def evaluate(model, tokenizer, data, judge, max_new_tokens: int, progress: bool, examples: int = 5) -> dict:
    """Toxicity of greedy continuations of ``data.prompts`` and perplexity on ``data.wiki``
    (with whatever steering is attached to ``model``), and the first ``examples``
    continuations."""
    texts = continuations(model, tokenizer, data.prompts, max_new_tokens, progress=progress)
    tox = toxicity(texts, judge)
    return {
        "toxicity_rate": tox["rate"],
        "toxicity_mean_prob": tox["mean_prob"],
        "perplexity": perplexity(model, tokenizer, data.wiki, progress=progress),
        "examples": [{"prompt": p, "continuation": c} for p, c in list(zip(data.prompts, texts))[:examples]],
    }


def gate_opening_report(model, tokenizer, gated, data, strength: float = 1.0) -> dict:
    """{"wiki", "prompts"}: the mean per-token gate opening g of ``gated`` on ``data.wiki`` and
    on ``data.prompts`` while it is applied at ``strength`` (> 0; the gates read the activations
    of the model steered at that strength). ``model`` must carry no steering of its own."""
    return {
        name: float(gate_openings(model, tokenizer, gated, texts, strength=strength)["mean"]) / strength
        for name, texts in (("wiki", data.wiki), ("prompts", data.prompts))
    }


def run_demo(
    model,
    tokenizer,
    data: DemoData,
    judge: Callable[[Sequence[str]], Sequence[float]],
    out_dir: str,
    modules: str = r".*post_attention_layernorm",
    steps: int = 100,
    optimizer: str = "adam",
    lr: float = 3e-3,
    sparsity: float = 0.3,
    strengths: Sequence[float] = (0.0, 1.5, 3.0),
    max_new_tokens: int = 20,
    seed: int = 0,
    progress: bool = True,
    gates: bool = True,
    gate_threshold: float = 0.0,
    gate_level: str = "token",
    control_opening: float | None = None,
    gate_strength: float = 3.0,
    linear_act_n: int = 32,
) -> dict:
    """Train, evaluate at each strength, with DSAS gates (fitted on ``data.control``, per token
    by default; ``control_opening`` caps their opening on the control sentences) at
    ``gate_strength`` (a gate opens about half on insult prompts, so the gated map needs a larger
    λ), and with Linear-AcT (fitted on the first ``linear_act_n`` source and target sentences, the
    paper's 32: its layer-by-layer fit costs a forward per layer, 200 s at 384 on 2 cores);
    write results; returns them. The defaults are the best recipe measured (README "Steering
    quality")."""
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    steering = train(
        model,
        tokenizer,
        data.source,
        data.target,
        modules=modules,
        steps=steps,
        optimizer=optimizer,
        lr=lr,
        sparsity=sparsity,
        seed=seed,
        progress=progress,
    )
    train_s = time.perf_counter() - t0
    steering.save(os.path.join(out_dir, "steering.safetensors"))
    t0 = time.perf_counter()
    lin_act = fit_linear_act(
        model, tokenizer, data.source[:linear_act_n], data.target[:linear_act_n], modules=modules
    )
    lin_act_s = time.perf_counter() - t0
    rows = []
    total = sum(steering.dims().values())
    for lam in strengths:
        with steering.apply(model, strength=lam):
            r = evaluate(model, tokenizer, data, judge, max_new_tokens, progress)
        rows.append(
            {
                "method": "LinEAS",
                "strength": lam,
                **r,
                "support": steering.support() if lam else 0,
                "coordinates": total,
                "train_s": train_s,
            }
        )
        _report_row(rows[-1])
    gate_report = None
    if gates and data.control:
        try:
            gated = fit_gates(
                model,
                tokenizer,
                data.source,
                data.control,
                steering,
                seed=seed,
                threshold=gate_threshold,
                on_low="disable",
                level=gate_level,
                control_opening=control_opening,
            )
        except ValueError as e:  # no module's gate reached the threshold
            gated, gate_report = None, {"error": str(e)}
            print(f"[LinEAS+DSAS] skipped: {e}")
        if gated is not None:
            gated.save(os.path.join(out_dir, "steering-dsas.safetensors"))
            gate_report = gated.metadata["gates"]
            lam = gate_strength
            with gated.apply(model, strength=lam):
                r = evaluate(model, tokenizer, data, judge, max_new_tokens, progress)
            opening = gate_opening_report(model, tokenizer, gated, data)
            rows.append(
                {
                    "method": "LinEAS+DSAS",
                    "strength": lam,
                    **r,
                    "support": gated.support(),
                    "coordinates": total,
                    "train_s": train_s,
                    "gate_opening": opening,
                }
            )
            _report_row(rows[-1])
            print(
                f"[LinEAS+DSAS] mean gate opening: {opening['wiki']:.2f} on Wikipedia, "
                f"{opening['prompts']:.2f} on the insult prompts"
            )
    with lin_act.apply(model, strength=1.0):
        r = evaluate(model, tokenizer, data, judge, max_new_tokens, progress)
    rows.append(
        {
            "method": "Linear-AcT",
            "strength": 1.0,
            **r,
            "support": lin_act.support(),
            "coordinates": total,
            "train_s": lin_act_s,
            "n_train": min(linear_act_n, len(data.source)),
        }
    )
    _report_row(rows[-1])
    history = steering.metadata.get("history", [])
    results = {
        "modules": modules,
        "steps": steps,
        "optimizer": optimizer,
        "lr": lr,
        "sparsity": sparsity,
        "seed": seed,
        "n_source": len(data.source),
        "n_target": len(data.target),
        "n_prompts": len(data.prompts),
        "n_wiki": len(data.wiki),
        "max_new_tokens": max_new_tokens,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "rows": rows,
        "gates": gate_report,
    }
    with atomic_path(os.path.join(out_dir, "results.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
    plot_results(rows, os.path.join(out_dir, "plot.png"))
    print(format_table(rows))
    return results


def _report_row(r):
    print(
        f"[{r['method']} λ={r['strength']}] toxicity {r['toxicity_rate']:.1%} "
        f"(mean p {r['toxicity_mean_prob']:.3f}), perplexity {r['perplexity']:.2f}",
        flush=True,
    )


def format_table(rows) -> str:
    lines = [
        "| method | λ | toxic continuations | mean toxicity p | Wikipedia PPL | support | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['strength']} | {r['toxicity_rate']:.1%} | "
            f"{r['toxicity_mean_prob']:.3f} | {r['perplexity']:.2f} | "
            f"{r['support']}/{r['coordinates']} | {r['train_s']:.0f} s |"
        )
    return "\n".join(lines)


def plot_results(rows, path: str) -> None:
    plt = pyplot("the demo's plot")

    lin = [r for r in rows if r["method"] == "LinEAS"]
    marks = {"Linear-AcT": "x", "LinEAS+DSAS": "*"}
    lam = [r["strength"] for r in lin]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(lam, [r["toxicity_rate"] for r in lin], "o-", color="tab:red", label="toxic rate")
    ax.set_xlabel("strength λ")
    ax.set_ylabel("toxic continuations", color="tab:red")
    ax2 = ax.twinx()
    ax2.plot(lam, [r["perplexity"] for r in lin], "s--", color="tab:blue", label="PPL")
    ax2.set_ylabel("Wikipedia perplexity", color="tab:blue")
    for r in rows:
        if r["method"] in marks:
            ax.plot([r["strength"]], [r["toxicity_rate"]], marks[r["method"]], color="tab:red", ms=10)
            ax2.plot([r["strength"]], [r["perplexity"]], marks[r["method"]], color="tab:blue", ms=10)
    ax.set_title("LinEAS on SmolLM2-135M (x: Linear-AcT, *: DSAS)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
