"""``lineas-fast generate``: continuations of prompts with a steering applied (one JSON line per
prompt on stdout)."""

from __future__ import annotations

import json

import torch

from lineas_fast.cli.argtypes import SEED, integer, nonblank, real
from lineas_fast.cli.dtypes import add_dtype, resolve_dtype
from lineas_fast.cli.errors import CLIError
from lineas_fast.cli.folders import (
    add_allow_missing,
    check_model_dir,
    fits,
    load_model,
    load_tokenizer,
    model_positions,
)
from lineas_fast.cli.readers import load_steering, read_sentences

NAME = "generate"
HELP = "generate text with a steering applied"
DESCRIPTION = (
    "Generate continuations with a steering file applied; a negative strength applies the inverse "
    "map (induces)."
)
DEFAULT_BATCH_SIZE = 8


def add_arguments(g) -> None:
    g.add_argument("--model", required=True)
    g.add_argument("--steering", required=True, help="file written by `lineas-fast train`")
    g.add_argument("--strength", type=real(), default=1.0)
    g.add_argument("--prompt", type=nonblank, action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", default=None, help="prompts, read as --source of train")
    g.add_argument("--max-new-tokens", type=integer(1), default=40)
    g.add_argument("--temperature", type=real(0), default=0.0, help="0: greedy")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument(
        "--batch-size",
        type=integer(1),
        default=DEFAULT_BATCH_SIZE,
        help="prompts generated together (default: %(default)s)",
    )
    g.add_argument("--no-strict", action="store_true", help="skip the model-fingerprint check")
    g.add_argument(
        "--compose", action="store_true", help="steer a model that already carries a fold (refused otherwise)"
    )
    add_dtype(g)
    add_allow_missing(g)


def run(args) -> int:
    check_model_dir(args.model)
    dtype = resolve_dtype(args.dtype, args.model)
    steering = load_steering(args.steering)
    prompts = [(f"--prompt {k}", p) for k, p in enumerate(args.prompt or [], 1)]
    if args.prompts_file:
        prompts += [
            (f"--prompts-file {args.prompts_file} sentence {k}", p)
            for k, p in enumerate(read_sentences(args.prompts_file, "--prompts-file"), 1)
        ]
    if not prompts:
        raise CLIError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    positions = model_positions(args.model)
    tok = load_tokenizer(args.model)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    texts = [p for _, p in prompts]
    for (where, p), ids in zip(prompts, tok(texts)["input_ids"]):
        if len(ids) == 0:
            raise CLIError(f"{where} ({p[:30]!r}) tokenizes to zero tokens: nothing to continue from")
    if positions:
        for (where, p), ids in zip(prompts, tok(texts)["input_ids"]):
            if len(ids) + args.max_new_tokens > positions:
                raise CLIError(
                    f"{where} ({p[:30]!r}) is {len(ids)} tokens: with "
                    f"--max-new-tokens {args.max_new_tokens} that needs "
                    f"{len(ids) + args.max_new_tokens} positions, more than the "
                    f"model's max_position_embeddings={positions}"
                )
    model, tok = load_model(args.model, dtype, tokenizer=tok, allow_missing=args.allow_missing_weights)
    fits(steering, model, args)
    torch.manual_seed(args.seed)
    gen_kw = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, pad_token_id=tok.pad_token_id
    )
    if args.temperature > 0:
        gen_kw["temperature"] = args.temperature
    with steering.apply(model, strength=args.strength, strict=not args.no_strict, compose=args.compose):
        for start in range(0, len(texts), args.batch_size):  # memory bounded by --batch-size
            batch = texts[start : start + args.batch_size]
            enc = tok(batch, return_tensors="pt", padding=True)
            out = model.generate(**enc, **gen_kw)
            for p, ids in zip(batch, out[:, enc["input_ids"].shape[1] :]):
                line = {
                    "prompt": p,
                    "strength": args.strength,
                    "continuation": tok.decode(ids, skip_special_tokens=True),
                }
                print(json.dumps(line), flush=True)
    return 0
