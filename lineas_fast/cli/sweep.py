"""``lineas-fast sweep``: the toxicity-vs-perplexity Pareto front of a real model, with intervals.

    lineas-fast sweep --model smollm2 --out sweep_smollm2 --sparsity 0 0.05 0.1 \\
        --strengths 0.25 0.5 0.75 1

Each recipe is fitted on ``--draws`` training draws (fresh sentences and seed each) and measured
at each strength on a validation and a test split of held-out prompts and Wikipedia texts, under
``--gen-seeds`` generation seeds (``--decoding sampled``, the paper's sampling, or ``greedy``); the
strength of each recipe is chosen on validation (lowest toxicity within ``--ppl-budget``) and every
reported number is the test split's mean with a 95% bootstrap interval over draws and prompts
(``lineas_fast.apps.sweep_draws``, ``apps.sweep_report``).

LinEAS recipes are the product of the axes given (modules × loss modules × sparsity × training
set size × steps × optimizer × learning rate × gates); the baselines (``--methods mean_shift
linear_act iti_c``) take modules × training set size × gates; ``prompting`` is one recipe (the
paper's instruction before each prompt). Without ``--modules`` LinEAS runs at
the family's foldable norms, mean-shift and Linear-AcT there and at ``.*o_proj``, ITI-C at
``.*o_proj`` (``DEFAULT_SITES``). ``--recipes FILE`` instead reads a JSON
list of recipe objects (fields of ``lineas_fast.apps.sweep.Recipe``). Writes ``sweep.json``,
``pareto.png``, each evaluation unit (``evals/``) and the fitted steerings into ``--out``; rerunning
into the same folder resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from lineas_fast.apps import assets
from lineas_fast.apps.decoding import MODES, Decoding
from lineas_fast.apps.sweep import GATE_LEVELS, METHODS, Recipe
from lineas_fast.apps.sweep_draws import Protocol, load_draw_data, run_draw_sweep
from lineas_fast.apps.sweep_report import format_interval_table, row_label
from lineas_fast.cli.argtypes import SEED, integer, real
from lineas_fast.cli.dtypes import add_dtype
from lineas_fast.cli.errors import CLIError
from lineas_fast.cli.folders import (
    add_allow_missing,
    check_match_time,
    check_model_dir,
    load_model,
    need_matplotlib,
)
from lineas_fast.cli.paths import check_output_dir
from lineas_fast.cli.patterns import regex

NAME = "sweep"
HELP = "toxicity-vs-perplexity Pareto front over recipes and strengths"
DESCRIPTION = __doc__.split("\n\n")[0]

# the model shortcuts and, per family, the default steered modules: those whose maps fold into
# an ordinary checkpoint (Llama's post-attention norm feeds the MLP, whose biases take the
# shift; Gemma-3's MLP has no bias flag and its post-norms feed the residual stream, so only the
# input norm, read by q/k/v with `attention_bias`, folds)
MODELS = {"smollm2": "smollm2_folder", "gemma3": "gemma3_folder"}
DEFAULT_MODULES = {"llama": r".*post_attention_layernorm", "gemma3_text": r".*input_layernorm"}
# where each method runs without --modules ("norms": the family's modules above): the baselines
# at their own best sites too, the attention outputs, where the LinEAS paper runs Linear-AcT and
# ITI-C (issue #31)
DEFAULT_SITES = {
    "lineas": ("norms",),
    "mean_shift": ("norms", r".*o_proj"),
    "linear_act": ("norms", r".*o_proj"),
    "iti_c": (r".*o_proj",),
}


def add_arguments(d) -> None:
    d.add_argument(
        "--model", default="smollm2", help="smollm2, gemma3 or a transformers folder (default: %(default)s)"
    )
    d.add_argument("--out", default="lineas_sweep", help="output folder (default: %(default)s)")
    d.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    d.add_argument(
        "--modules",
        type=regex,
        nargs="+",
        default=None,
        help="steered modules (default: the family's foldable norms; the baselines also at .*o_proj, "
        "ITI-C there only)",
    )
    d.add_argument(
        "--loss-modules",
        nargs="+",
        default=["same"],
        help="where the loss is measured ('same': the steered modules)",
    )
    d.add_argument("--sparsity", type=real(0), nargs="+", default=[0.0])
    d.add_argument("--n-train", type=integer(2), nargs="+", default=[32])
    d.add_argument("--steps", type=integer(1), nargs="+", default=[100])
    d.add_argument("--optimizer", choices=["sgd", "adam"], nargs="+", default=["adam"])
    d.add_argument("--lr", type=real(0, low_open=True), nargs="+", default=None)
    d.add_argument("--gates", choices=[g or "none" for g in GATE_LEVELS], nargs="+", default=["none"])
    d.add_argument(
        "--control-opening",
        type=real(0, 1, low_open=True),
        default=None,
        help="gated recipes: lower each gate's bias until its mean opening on the "
        "control sentences is at most this",
    )
    d.add_argument(
        "--gate-control",
        choices=["sentences", "wikipedia", "wikipedia+targets"],
        default="sentences",
        help="gated recipes, interval sweep: fit the gates against the neutral control sentences "
        "(default), against Wikipedia extracts held out from the evaluation (they stay shut on "
        "encyclopedic text), or against those extracts and each draw's target sentences",
    )
    d.add_argument(
        "--target-judged-below",
        type=real(0, low_open=True, high=1),
        default=None,
        help="train toward target sentences the judge rates below this toxicity probability only "
        "(default: every target sentence)",
    )
    d.add_argument("--strengths", type=real(0, low_open=True), nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    d.add_argument("--recipes", help="a JSON list of recipe objects instead of the axes")
    d.add_argument(
        "--draws", type=integer(1), default=3, help="training draws per recipe (default: %(default)s)"
    )
    d.add_argument(
        "--gen-seeds", type=integer(1), default=2, help="generation seeds per prompt (default: %(default)s)"
    )
    d.add_argument(
        "--decoding",
        choices=MODES,
        default="sampled",
        help="sampled: temperature 1.0, top-p 0.3, repetition penalty 1.2 (the paper's); greedy: one seed",
    )
    d.add_argument("--prompts", type=integer(1), default=200, help="test prompts (default: %(default)s)")
    d.add_argument(
        "--val-prompts", type=integer(1), default=100, help="validation prompts (default: %(default)s)"
    )
    d.add_argument("--wiki", type=integer(1), default=100, help="test Wikipedia extracts for perplexity")
    d.add_argument("--val-wiki", type=integer(1), default=50, help="validation Wikipedia extracts")
    d.add_argument(
        "--max-new-tokens", type=integer(1), default=None, help="default 32 (sampled) or 20 (greedy)"
    )
    d.add_argument(
        "--ppl-budget",
        type=real(0, low_open=True),
        default=0.10,
        help="perplexity increase allowed when choosing a strength on validation, and in the target "
        "(default: %(default)s)",
    )
    d.add_argument(
        "--tox-factor",
        type=real(1),
        default=2.0,
        help="the target's toxicity reduction: mean toxicity at most unsteered / this (default: "
        "%(default)s; issue #31's goal is 3 with --ppl-budget 0.03)",
    )
    d.add_argument("--n-boot", type=integer(100), default=2000, help="bootstrap replicates per interval")
    d.add_argument("--seed", type=SEED, default=0)
    add_dtype(d)
    add_allow_missing(d)


def recipes_from_args(args, model_type: str = "llama") -> list[Recipe]:
    """The recipes the axes (or ``--recipes``) describe."""
    if args.recipes:
        try:
            with open(args.recipes) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise CLIError(f"--recipes {args.recipes!r}: cannot read a JSON list: {e}") from None
        if not isinstance(raw, list) or not raw:
            raise CLIError(f"--recipes {args.recipes!r}: expected a non-empty JSON list of objects")
        out = []
        for i, r in enumerate(raw):
            try:
                rec = Recipe(**r)
                rec.check()
                for pattern in (rec.modules, rec.loss_modules):
                    if pattern:
                        regex(pattern)  # the command line's backtracking rule (cli/patterns.py)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise CLIError(f"--recipes {args.recipes!r}: item {i}: {e}") from None
            out.append(rec)
        return out
    norms = DEFAULT_MODULES.get(model_type, r".*post.*layernorm")
    gates = [None if g == "none" else g for g in args.gates]
    if args.gate_control != "sentences" and not any(gates):
        raise CLIError(
            f"--gate-control {args.gate_control}: no recipe is gated (add --gates token or sentence)"
        )
    loss = [None if m == "same" else _regex(m, "--loss-modules") for m in args.loss_modules]
    out = []
    for method in args.methods:
        if method == "prompting":  # the paper's instruction; nothing to fit, no strength
            out.append(Recipe("prompting"))
            continue
        modules = args.modules or [norms if m == "norms" else m for m in DEFAULT_SITES[method]]
        if method == "lineas":
            for m, lm, s, n, st, opt, lr, g in itertools.product(
                modules,
                loss,
                args.sparsity,
                args.n_train,
                args.steps,
                args.optimizer,
                args.lr or [None],
                gates,
            ):
                out.append(
                    Recipe(
                        "lineas",
                        m,
                        loss_modules=lm,
                        sparsity=s,
                        steps=st,
                        optimizer=opt,
                        lr=lr,
                        n_train=n,
                        target_judged_below=args.target_judged_below,
                        **_gating(args, g),
                    )
                )
        else:
            for m, n, g in itertools.product(modules, args.n_train, gates):
                out.append(
                    Recipe(
                        method,
                        m,
                        n_train=n,
                        target_judged_below=args.target_judged_below,
                        **_gating(args, g),
                    )
                )
    return out


def _gating(args, gates) -> dict:
    """A recipe's gate fields: the level, and the opening and control flags where it is gated."""
    return {
        "gates": gates,
        "control_opening": args.control_opening if gates else None,
        "gate_control": None if not gates or args.gate_control == "sentences" else args.gate_control,
    }


def _regex(value: str, flag: str) -> str:
    try:
        return regex(value)
    except argparse.ArgumentTypeError as e:
        raise CLIError(f"{flag} {value!r}: {e}") from None


def protocol_from_args(args) -> Protocol:
    """The measurement protocol the flags give."""
    if args.decoding == "greedy":
        decoding = Decoding.greedy(args.max_new_tokens or 20)
    else:
        decoding = Decoding(max_new_tokens=args.max_new_tokens or 32)
    return Protocol(args.draws, args.gen_seeds, decoding, args.seed, args.n_boot).check()


def run(args) -> int:
    inputs = {"--model": None if args.model in MODELS else args.model, "--recipes": args.recipes}
    check_output_dir(args.out, "--out", inside=True, inputs=inputs)
    need_matplotlib("lineas-fast sweep")
    recipes = recipes_from_args(args)  # checks the file and the values early
    protocol = protocol_from_args(args)
    if args.decoding == "greedy" and args.gen_seeds > 1:
        print(f"--decoding greedy: one generation seed (--gen-seeds {args.gen_seeds} ignored)")
    try:
        judge = assets.toxicity_judge()
        if args.model in MODELS:
            folder = getattr(assets, MODELS[args.model])()
        else:
            check_model_dir(args.model, "--model")
            folder = args.model
        data = load_draw_data(args.val_prompts, args.prompts, args.val_wiki, args.wiki, seed=args.seed)
    except assets.AssetError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:  # more prompts or texts asked than the data holds
        raise CLIError(f"--val-prompts/--prompts/--val-wiki/--wiki: {e}") from None
    n_max, pool = max(r.n_train for r in recipes), min(len(data.insults), len(data.neutral))
    if n_max > pool:
        raise CLIError(f"--n-train {n_max}: each draw samples from pools of {pool} sentences (at most that)")
    model, tok = load_model(folder, args.dtype, allow_missing=args.allow_missing_weights)
    if not args.recipes and not args.modules:  # the family's default modules
        recipes = recipes_from_args(args, model.config.model_type)
    for pattern in dict.fromkeys(p for r in recipes for p in (r.modules, r.loss_modules) if p):
        check_match_time(pattern, "--recipes" if args.recipes else "--modules/--loss-modules", model)
    torch.set_grad_enabled(True)
    res = run_draw_sweep(
        model,
        tok,
        data,
        judge,
        recipes,
        args.strengths,
        args.out,
        protocol,
        tox_factor=args.tox_factor,
        ppl_budget=args.ppl_budget,
        model_name=args.model if args.model in MODELS else folder,
    )
    chosen = [i for i, r in enumerate(res["rows"]) if i == 0 or r.get("choice") == "validation"]
    print(format_interval_table(res, chosen))
    best = res["best"]
    if best is None:
        print("chosen on validation: no recipe meets the target there")
    else:
        r = res["rows"][best]
        ci = r["ci"]["toxicity_mean_prob"]
        print(
            f"chosen on validation: {row_label(r)}; on the test split: mean toxicity p "
            f"{r['toxicity_mean_prob']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}], perplexity "
            f"{r['perplexity']:.4g} ({r['n']['draws']} draws × {r['n']['seeds']} seeds × "
            f"{r['n']['prompts']} prompts)"
        )
    print(f"wrote {args.out}/sweep.json, pareto.png, evals/, steerings/")
    return 0
