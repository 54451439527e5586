"""``lineas-fast sweep``: the toxicity-vs-perplexity Pareto front of a real model.

    lineas-fast sweep --model smollm2 --out sweep_smollm2 --sparsity 0 0.05 0.1 \\
        --strengths 0.25 0.5 0.75 1

LinEAS recipes are the product of the axes given (modules × loss modules × sparsity × training
set size × steps × optimizer × learning rate × gates); the baselines (``--methods mean_shift
linear_act``) take modules × training set size × gates. ``--recipes FILE`` instead reads a JSON
list of recipe objects (fields of ``lineas_fast.apps.sweep.Recipe``). Writes ``sweep.json``,
``pareto.png`` and the fitted steerings into ``--out``; rerunning into the same folder resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from lineas_fast.apps import assets
from lineas_fast.apps.sweep import GATE_LEVELS, METHODS, Recipe, format_table, load_sweep_data, run_sweep
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
POOL = 384  # training pools drawn once, the same for every run (a recipe takes a prefix)
DEFAULT_MODULES = {"llama": r".*post_attention_layernorm", "gemma3_text": r".*input_layernorm"}


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
        help="steered modules (default: the family's foldable norms)",
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
    d.add_argument("--strengths", type=real(0, low_open=True), nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    d.add_argument("--recipes", help="a JSON list of recipe objects instead of the axes")
    d.add_argument("--prompts", type=integer(1), default=200, help="held-out prompts")
    d.add_argument("--wiki", type=integer(1), default=100, help="Wikipedia extracts for perplexity")
    d.add_argument("--max-new-tokens", type=integer(1), default=20)
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
    modules = args.modules or [DEFAULT_MODULES.get(model_type, r".*post.*layernorm")]
    gates = [None if g == "none" else g for g in args.gates]
    loss = [None if m == "same" else _regex(m, "--loss-modules") for m in args.loss_modules]
    out = []
    for method in args.methods:
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
                out.append(Recipe("lineas", m, lm, s, st, opt, lr, n, g, args.control_opening if g else None))
        else:
            for m, n, g in itertools.product(modules, args.n_train, gates):
                out.append(
                    Recipe(method, m, n_train=n, gates=g, control_opening=args.control_opening if g else None)
                )
    return out


def _regex(value: str, flag: str) -> str:
    try:
        return regex(value)
    except argparse.ArgumentTypeError as e:
        raise CLIError(f"{flag} {value!r}: {e}") from None


def run(args) -> int:
    inputs = {"--model": None if args.model in MODELS else args.model, "--recipes": args.recipes}
    check_output_dir(args.out, "--out", inside=True, inputs=inputs)
    need_matplotlib("lineas-fast sweep")
    recipes = recipes_from_args(args)  # checks the file and the values early
    n_max = max(r.n_train for r in recipes)
    if n_max > POOL:
        raise CLIError(f"n_train {n_max}: the sweep's training pools hold {POOL} sentences each")
    try:
        judge = assets.toxicity_judge()
        if args.model in MODELS:
            folder = getattr(assets, MODELS[args.model])()
        else:
            check_model_dir(args.model, "--model")
            folder = args.model
        data = load_sweep_data(POOL, args.prompts, args.wiki, seed=args.seed)
    except assets.AssetError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:  # more sentences asked than the data holds
        raise CLIError(f"--prompts {args.prompts}: {e}") from None
    model, tok = load_model(folder, args.dtype, allow_missing=args.allow_missing_weights)
    if not args.recipes and not args.modules:  # the family's default modules
        recipes = recipes_from_args(args, model.config.model_type)
    for pattern in dict.fromkeys(p for r in recipes for p in (r.modules, r.loss_modules) if p):
        check_match_time(pattern, "--recipes" if args.recipes else "--modules/--loss-modules", model)
    torch.set_grad_enabled(True)
    res = run_sweep(
        model,
        tok,
        data,
        judge,
        recipes,
        args.strengths,
        args.out,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        model_name=args.model if args.model in MODELS else folder,
    )
    print(format_table(res, res["pareto"]))
    best = res["best"]
    print(
        "meets the target: "
        + (
            res["rows"][best]["label"] + f" at λ={res['rows'][best]['strength']:g}"
            if best is not None
            else "no row"
        )
    )
    print(f"wrote {args.out}/sweep.json, pareto.png, steerings/")
    return 0
