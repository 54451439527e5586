"""``lineas-fast demo``: the README's main job, steering SmolLM2-135M-Instruct away from insults
and measuring it (``lineas_fast.apps.demo``)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lineas_fast.apps import assets
from lineas_fast.apps.demo import load_demo_data, run_demo
from lineas_fast.cli.argtypes import SEED, integer, real
from lineas_fast.cli.errors import CLIError
from lineas_fast.cli.folders import check_match_time, need_matplotlib
from lineas_fast.cli.paths import check_output_dir
from lineas_fast.cli.patterns import regex

NAME = "demo"
HELP = "steer SmolLM2-135M away from insults and measure it"
DESCRIPTION = "The README's main job: steer SmolLM2-135M-Instruct away from insults and measure it."


def add_arguments(d) -> None:
    d.add_argument("--out", default="lineas_demo", help="output folder (default: %(default)s)")
    d.add_argument("--steps", type=integer(1), default=100)
    d.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    d.add_argument("--lr", type=real(0, low_open=True), default=3e-3)
    d.add_argument(
        "--n-train",
        type=integer(2, 384),
        default=384,
        help="insults (source) and non-insults (target) to train on",
    )
    d.add_argument("--sparsity", type=real(0), default=0.3)
    d.add_argument("--modules", type=regex, default=r".*post_attention_layernorm")
    d.add_argument("--strengths", type=real(), nargs="+", default=[0.0, 1.5, 3.0])
    d.add_argument("--prompts", type=integer(1), default=100, help="held-out prompts")
    d.add_argument("--wiki", type=integer(1), default=50, help="Wikipedia extracts for perplexity")
    d.add_argument("--seed", type=SEED, default=0)
    d.add_argument("--no-gates", action="store_true", help="skip the DSAS-gated evaluation")


def check_args(args) -> None:
    """The checks of ``demo`` that need no download, model or data (a CLIError names the
    argument): the output folder can be written."""
    check_output_dir(args.out, "--out", inside=True)
    need_matplotlib("lineas-fast demo")


def run(args) -> int:
    check_args(args)
    try:
        judge = assets.toxicity_judge()
        print("fetching data (cached after the first run)...", flush=True)
        data = load_demo_data(n_train=args.n_train, n_prompts=args.prompts, n_wiki=args.wiki, seed=args.seed)
        folder = assets.smollm2_folder()
    except assets.AssetError as e:
        raise CLIError(str(e)) from None
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    check_match_time(args.modules, "--modules", model)
    run_demo(
        model,
        tok,
        data,
        judge,
        args.out,
        modules=args.modules,
        steps=args.steps,
        optimizer=args.optimizer,
        lr=args.lr,
        sparsity=args.sparsity,
        strengths=args.strengths,
        seed=args.seed,
        gates=not args.no_gates,
    )
    print(f"wrote {args.out}/results.json, plot.png, steering.safetensors")
    return 0
