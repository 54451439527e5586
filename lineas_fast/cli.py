"""Command line: ``lineas-fast train | generate | fuse | demo``."""
from __future__ import annotations

import argparse
import json
import sys

from .cli_io import CLIError, load_model, load_model_or_pipeline, load_pipeline, read_sentences
from .demo import add_demo_parser
from .fusion_cli import add_fuse_parser



def cmd_train(args) -> int:
    import lineas_fast as lf
    source = read_sentences(args.source, "source")
    target = read_sentences(args.target, "target")
    model, tok = load_model_or_pipeline(args)
    try:
        steering = lf.train(model, tok, source, target, modules=args.modules,
                            loss_modules=args.loss_modules, steps=args.steps,
                            batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                            sparsity=args.sparsity, seed=args.seed, max_length=args.max_length,
                            init=args.init, checkpoint_every=args.checkpoint_every,
                            checkpoint_path=args.checkpoint, resume_from=args.resume,
                            timestep=args.timestep)
    except ValueError as e:
        raise CLIError(str(e)) from None
    steering.save(args.out)
    hist = steering.metadata["history"]
    if hist:
        print(f"loss {hist[0]['loss']:.4g} -> {hist[-1]['loss']:.4g}, "
              f"support {steering.support()}/{sum(steering.dims().values())}")
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    import torch
    import lineas_fast as lf
    model, tok = load_model(args.model)
    try:
        steering = lf.Steering.load(args.steering)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_sentences(args.prompts_file, "prompts")
    if not prompts:
        raise CLIError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(args.seed)
    gen_kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                  pad_token_id=tok.pad_token_id)
    if args.temperature > 0:
        gen_kw["temperature"] = args.temperature
    try:
        with steering.apply(model, strength=args.strength, strict=not args.no_strict):
            out = model.generate(**enc, **gen_kw)
    except ValueError as e:
        raise CLIError(str(e)) from None
    for p, ids in zip(prompts, out[:, enc["input_ids"].shape[1]:]):
        print(json.dumps({"prompt": p, "strength": args.strength,
                          "continuation": tok.decode(ids, skip_special_tokens=True)}))
    return 0


def cmd_generate_image(args) -> int:
    import lineas_fast as lf
    from .diffusion import image_grid, strength_sweep
    from .io import atomic_path
    pipe = load_pipeline(args.pipeline)
    try:
        steering = lf.Steering.load(args.steering)
        steering.validate(pipe)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    images = strength_sweep(pipe, steering, args.prompt, args.strengths, args.steps, args.seed,
                            args.guidance)
    with atomic_path(args.out) as tmp:
        image_grid(images).save(tmp, format="PNG")
    print(f"wrote {args.out} (strengths {args.strengths})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lineas-fast", description="Fast LinEAS activation steering.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="learn steering maps from source and target sentences",
                       description="Train LinEAS maps so the model's activations on SOURCE "
                                   "sentences match those on TARGET sentences.")
    t.add_argument("--model", help="local transformers causal LM folder")
    t.add_argument("--pipeline", help="local diffusers pipeline folder (instead of --model)")
    t.add_argument("--timestep", type=int, default=None,
                   help="diffusers: denoising timestep where the loss is taken")
    t.add_argument("--source", required=True, help="text file (one sentence per line) or JSONL")
    t.add_argument("--target", required=True, help="text file (one sentence per line) or JSONL")
    t.add_argument("--modules", default=".*post.*layernorm",
                   help="regex (fullmatch) over named_modules() for the maps (default: %(default)s)")
    t.add_argument("--loss-modules", default=None, help="regex for where the loss is measured")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    t.add_argument("--lr", type=float, default=None, help="default 0.1 (sgd) or 0.01 (adam)")
    t.add_argument("--sparsity", type=float, default=0.0, help="sparse group lasso strength γ")
    t.add_argument("--init", choices=["linear_act"], default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--checkpoint", default=None, help="checkpoint file to write")
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--resume", default=None, help="checkpoint to resume from")
    t.add_argument("--out", required=True, help="steering file to write (.safetensors)")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text with a steering applied",
                       description="Generate continuations with a steering file applied; a "
                                   "negative strength applies the inverse map (induces).")
    g.add_argument("--model", required=True)
    g.add_argument("--steering", required=True, help="file written by `lineas-fast train`")
    g.add_argument("--strength", type=float, default=1.0)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", default=None)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-strict", action="store_true", help="skip the model-fingerprint check")
    g.set_defaults(func=cmd_generate)

    add_fuse_parser(sub)
    i = sub.add_parser("generate-image", help="a grid PNG of a strength sweep (diffusers)",
                       description="Generate one image per strength with the same seed and save "
                                   "them side by side; negative strengths induce the concept.")
    i.add_argument("--pipeline", required=True, help="local diffusers pipeline folder")
    i.add_argument("--steering", required=True)
    i.add_argument("--prompt", required=True)
    i.add_argument("--strengths", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0])
    i.add_argument("--steps", type=int, default=20, help="denoising steps")
    i.add_argument("--guidance", type=float, default=7.5)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--out", required=True, help="PNG file to write")
    i.set_defaults(func=cmd_generate_image)
    add_demo_parser(sub)
    return ap


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"lineas-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
