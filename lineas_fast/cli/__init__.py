"""Command line: ``lineas-fast train | generate | fuse [--gguf] | bench | generate-image | demo |
sweep``.

Contract: a user error (a bad value, a missing or malformed file, an output that cannot be
written, a library ``ValueError``/``TypeError``/``OSError``/``FusionError``/
``TrainingDivergedError``) exits with status 2 and one line on stderr,
``lineas-fast <command>: error: ...``, naming the argument, the value and what is expected;
every check that needs no model runs before a model is loaded or a step is trained, and no
output is written by a failing command. Status 1 is for bugs (a short message; set
``LINEAS_FAST_TRACEBACK=1`` for the traceback); 130 for Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys

from lineas_fast.apps.demo import add_demo_parser
from lineas_fast.cli.common import (
    SEED,
    ArgumentParser,
    CLIError,
    check_checkpoint,
    check_model_dir,
    check_output_file,
    check_pipeline_dir,
    fits,
    integer,
    interactive,
    load_model,
    load_model_or_pipeline,
    load_pipeline,
    load_steering,
    load_tokenizer,
    model_or_pipeline,
    model_positions,
    name_flags,
    nonblank,
    one_line,
    read_sentences,
    real,
    regex,
    scheduler_timesteps,
)
from lineas_fast.cli.fuse import add_fuse_parser
from lineas_fast.cli.gguf import add_gguf_to_fuse
from lineas_fast.cli.sweep import add_sweep_parser
from lineas_fast.serve.bench import add_bench_parser

DEFAULT_MAX_LENGTH = 128
# library argument names -> the train flags that set them (named in library error messages)
TRAIN_FLAGS = {
    "loss_modules": "--loss-modules",
    "modules": "--modules",
    "steps": "--steps",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "sparsity": "--sparsity",
    "max_length": "--max-length",
    "init": "--init",
    "checkpoint_every": "--checkpoint-every",
    "checkpoint_path": "--checkpoint",
    "resume_from": "--resume",
    "timestep": "--timestep",
    "source": "--source",
    "target": "--target",
}


def _train_config(args, max_length: int) -> dict | None:
    """The settings a checkpoint of this run records (None if they cannot be built here)."""
    from dataclasses import asdict

    try:
        from lineas_fast.training.trainer import TrainConfig

        return asdict(
            TrainConfig(
                modules=args.modules,
                loss_modules=args.loss_modules,
                steps=args.steps,
                batch_size=args.batch_size,
                optimizer=args.optimizer,
                lr=args.lr,
                sparsity=args.sparsity,
                seed=args.seed,
                max_length=max_length,
                init=args.init,
            )
        )
    except (ImportError, TypeError):
        return None


def check_train_args(args) -> int:
    """Every check of ``train`` that needs no model; returns the max_length to train with."""
    kind = model_or_pipeline(args)
    if kind == "model" and args.timestep is not None:
        raise CLIError(f"--timestep {args.timestep}: applies to --pipeline only, not --model")
    if kind == "pipeline" and args.max_length is not None:
        raise CLIError(f"--max-length {args.max_length}: applies to --model only, not --pipeline")
    if args.checkpoint_every and not args.checkpoint:
        raise CLIError(
            f"--checkpoint-every {args.checkpoint_every} needs --checkpoint FILE "
            f"(where to write the checkpoint)"
        )
    if args.checkpoint and not args.checkpoint_every:
        raise CLIError(
            f"--checkpoint {args.checkpoint!r} needs --checkpoint-every K > 0 (how "
            f"many steps between checkpoints)"
        )
    inputs = {"--source": args.source, "--target": args.target, "--resume": args.resume}
    check_output_file(args.out, "--out", inputs)
    if args.checkpoint:
        check_output_file(
            args.checkpoint,
            "--checkpoint",
            {"--source": args.source, "--target": args.target, "--out": args.out},
        )
    max_length = args.max_length or DEFAULT_MAX_LENGTH
    if kind == "model":
        positions = model_positions(args.model)
        if positions and max_length > positions:
            if args.max_length is None:
                max_length = positions  # the default, cut to the model's context
            else:
                raise CLIError(
                    f"--max-length {args.max_length} exceeds the model's "
                    f"max_position_embeddings={positions} ({args.model!r}); give "
                    f"--max-length <= {positions}"
                )
    else:
        total = scheduler_timesteps(args.pipeline)
        if args.timestep is not None and total and args.timestep >= total:
            raise CLIError(
                f"--timestep {args.timestep} is outside the scheduler's timesteps "
                f"[0, {total}) of {args.pipeline!r}"
            )
    return max_length


def cmd_train(args) -> int:
    import lineas_fast as lf

    max_length = check_train_args(args)
    source = read_sentences(args.source, "--source")
    target = read_sentences(args.target, "--target")
    if args.resume:
        check_checkpoint(args.resume, "--resume", _train_config(args, max_length))
    model, tok = load_model_or_pipeline(args)
    try:
        steering = lf.train(
            model,
            tok,
            source,
            target,
            modules=args.modules,
            loss_modules=args.loss_modules,
            steps=args.steps,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            sparsity=args.sparsity,
            seed=args.seed,
            max_length=max_length,
            init=args.init,
            checkpoint_every=args.checkpoint_every,
            checkpoint_path=args.checkpoint,
            resume_from=args.resume,
            timestep=args.timestep,
            progress=interactive(),
        )
    except (ValueError, TypeError, OSError) as e:
        raise CLIError(name_flags(e, TRAIN_FLAGS)) from None
    steering.save(args.out)
    hist = steering.metadata["history"]
    if hist:
        print(
            f"loss {hist[0]['loss']:.4g} -> {hist[-1]['loss']:.4g}, "
            f"support {steering.support()}/{sum(steering.dims().values())}"
        )
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    import torch

    check_model_dir(args.model)
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
    if positions:
        for (where, p), ids in zip(prompts, tok(texts)["input_ids"]):
            if len(ids) + args.max_new_tokens > positions:
                raise CLIError(
                    f"{where} ({p[:30]!r}) is {len(ids)} tokens: with "
                    f"--max-new-tokens {args.max_new_tokens} that needs "
                    f"{len(ids) + args.max_new_tokens} positions, more than the "
                    f"model's max_position_embeddings={positions}"
                )
    model, tok = load_model(args.model, tokenizer=tok)
    fits(steering, model, args)
    enc = tok(texts, return_tensors="pt", padding=True)
    torch.manual_seed(args.seed)
    gen_kw = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, pad_token_id=tok.pad_token_id
    )
    if args.temperature > 0:
        gen_kw["temperature"] = args.temperature
    with steering.apply(model, strength=args.strength, strict=not args.no_strict):
        out = model.generate(**enc, **gen_kw)
    for p, ids in zip(texts, out[:, enc["input_ids"].shape[1] :]):
        print(
            json.dumps(
                {
                    "prompt": p,
                    "strength": args.strength,
                    "continuation": tok.decode(ids, skip_special_tokens=True),
                }
            )
        )
    return 0


def cmd_generate_image(args) -> int:
    from lineas_fast.apps.diffusion import image_grid, strength_sweep
    from lineas_fast.atomic import atomic_path

    check_pipeline_dir(args.pipeline)
    check_output_file(args.out, "--out", {"--steering": args.steering}, suffix=".png")
    steering = load_steering(args.steering)
    pipe = load_pipeline(args.pipeline)
    fits(steering, pipe, args, "--pipeline")
    images = strength_sweep(pipe, steering, args.prompt, args.strengths, args.steps, args.seed, args.guidance)
    with atomic_path(args.out) as tmp:
        image_grid(images).save(tmp, format="PNG")
    print(f"wrote {args.out} (strengths {args.strengths})")
    return 0


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="lineas-fast", description="Fast LinEAS activation steering.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="learn steering maps from source and target sentences",
        description="Train LinEAS maps so the model's activations on SOURCE "
        "sentences match those on TARGET sentences.",
    )
    t.add_argument("--model", help="local transformers causal LM folder")
    t.add_argument("--pipeline", help="local diffusers pipeline folder (instead of --model)")
    t.add_argument(
        "--timestep",
        type=integer(0),
        default=None,
        help="diffusers: denoising timestep where the loss is taken",
    )
    t.add_argument(
        "--source",
        required=True,
        help="sentences: one per line, JSON lines or a JSON array (read by content)",
    )
    t.add_argument("--target", required=True, help="sentences, as --source")
    t.add_argument(
        "--modules",
        type=regex,
        default=".*post.*layernorm",
        help="regex (fullmatch) over named_modules() for the maps (default: %(default)s)",
    )
    t.add_argument("--loss-modules", type=regex, default=None, help="regex for where the loss is measured")
    t.add_argument("--steps", type=integer(0), default=1000)
    t.add_argument("--batch-size", type=integer(1), default=32)
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    t.add_argument(
        "--lr", type=real(0, low_open=True), default=None, help="default 0.1 (sgd) or 0.003 (adam)"
    )
    t.add_argument("--sparsity", type=real(0), default=0.0, help="sparse group lasso strength γ")
    t.add_argument("--init", choices=["linear_act"], default=None)
    t.add_argument("--seed", type=SEED, default=0)
    t.add_argument(
        "--max-length",
        type=integer(1),
        default=None,
        help=f"tokens per sentence (default {DEFAULT_MAX_LENGTH}, at most the model's positions)",
    )
    t.add_argument("--checkpoint", default=None, help="checkpoint file to write")
    t.add_argument(
        "--checkpoint-every", type=integer(0), default=0, help="steps between checkpoints (with --checkpoint)"
    )
    t.add_argument("--resume", default=None, help="checkpoint to resume from")
    t.add_argument("--out", required=True, help="steering file to write (.safetensors)")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser(
        "generate",
        help="generate text with a steering applied",
        description="Generate continuations with a steering file applied; a "
        "negative strength applies the inverse map (induces).",
    )
    g.add_argument("--model", required=True)
    g.add_argument("--steering", required=True, help="file written by `lineas-fast train`")
    g.add_argument("--strength", type=real(), default=1.0)
    g.add_argument("--prompt", type=nonblank, action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", default=None, help="prompts, read as --source of train")
    g.add_argument("--max-new-tokens", type=integer(1), default=40)
    g.add_argument("--temperature", type=real(0), default=0.0, help="0: greedy")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--no-strict", action="store_true", help="skip the model-fingerprint check")
    g.set_defaults(func=cmd_generate)

    add_fuse_parser(sub)
    add_gguf_to_fuse(sub.choices["fuse"])
    add_bench_parser(sub)
    i = sub.add_parser(
        "generate-image",
        help="a grid PNG of a strength sweep (diffusers)",
        description="Generate one image per strength with the same seed and save "
        "them side by side; negative strengths induce the concept.",
    )
    i.add_argument("--pipeline", required=True, help="local diffusers pipeline folder")
    i.add_argument("--steering", required=True)
    i.add_argument("--prompt", type=nonblank, required=True)
    i.add_argument("--strengths", type=real(), nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0])
    i.add_argument("--steps", type=integer(1), default=20, help="denoising steps")
    i.add_argument("--guidance", type=real(), default=7.5)
    i.add_argument("--seed", type=SEED, default=0)
    i.add_argument("--out", required=True, help="PNG file to write")
    i.set_defaults(func=cmd_generate_image)
    add_demo_parser(sub)
    add_sweep_parser(sub)
    return ap


def _user_errors() -> tuple:
    import lineas_fast as lf

    return (ValueError, TypeError, OSError, lf.FusionError, lf.TrainingDivergedError)


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2: user error, 1: bug)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2)
        return e.code if isinstance(e.code, int) else 2
    prefix = f"lineas-fast {args.command}"
    try:
        return args.func(args)
    except CLIError as e:
        print(f"{prefix}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- sorted below
        if isinstance(e, _user_errors()):
            print(f"{prefix}: error: {one_line(e)}", file=sys.stderr)
            return 2
        if os.environ.get("LINEAS_FAST_TRACEBACK"):
            import traceback

            traceback.print_exc()
        print(
            f"{prefix}: internal error (a bug in lineas-fast, please report it): "
            f"{type(e).__name__}: {one_line(e)} (set LINEAS_FAST_TRACEBACK=1 for the "
            f"traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
