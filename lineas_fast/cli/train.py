"""``lineas-fast train``: learn steering maps from source and target sentences."""

from __future__ import annotations

from dataclasses import asdict

from lineas_fast.cli.budget import add_budget_arguments, calibrated_metadata, read_budget_texts
from lineas_fast.cli.common import (
    SEED,
    CLIError,
    add_allow_missing,
    check_checkpoint,
    check_match_time,
    check_output_file,
    flag_message,
    integer,
    interactive,
    load_model_or_pipeline,
    model_or_pipeline,
    model_positions,
    read_sentences,
    real,
    regex,
    scheduler_timesteps,
)
from lineas_fast.cli.dtypes import add_dtype
from lineas_fast.cli.launching import (
    add_launch_arguments,
    check_launch,
    check_shares,
    restart_resume,
    start_job,
)
from lineas_fast.training.distributed import DistributedError, finish, is_main, launched
from lineas_fast.training.trainer import TrainConfig, train

NAME = "train"
HELP = "learn steering maps from source and target sentences"
DESCRIPTION = (
    "Train LinEAS maps so the model's activations on SOURCE sentences match those on TARGET sentences."
)
DEFAULT_MAX_LENGTH = 128
# library argument names -> the train flags that set them (``ArgumentError.argument``)
TRAIN_FLAGS = {
    "loss_modules": "--loss-modules",
    "modules": "--modules",
    "steps": "--steps",
    "batch_size": "--batch-size",
    "optimizer": "--optimizer",
    "lr": "--lr",
    "sparsity": "--sparsity",
    "seed": "--seed",
    "max_length": "--max-length",
    "init": "--init",
    "checkpoint_every": "--checkpoint-every",
    "checkpoint_path": "--checkpoint",
    "resume_from": "--resume",
    "timestep": "--timestep",
    "source": "--source",
    "target": "--target",
    "fsdp": "--fsdp",
}


def add_arguments(t) -> None:
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
    t.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model's decoder layers over the processes (FSDP2); rank 0 "
        "reads the weights, the other ranks receive their shards from it",
    )
    add_launch_arguments(t)
    add_dtype(t)
    add_allow_missing(t)
    add_budget_arguments(t)  # --ppl-budget, --ppl-texts (cli/budget.py)


def train_settings(args, max_length: int) -> dict:
    """The training settings the flags give: what ``lf.train`` takes and a checkpoint records."""
    return dict(
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


def train_config(args, max_length: int) -> dict | None:
    """The settings a checkpoint of this run records (None if they cannot be built here)."""
    try:
        return asdict(TrainConfig(**train_settings(args, max_length)))
    except (ValueError, TypeError):
        return None


def check_args(args) -> int:
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
    folder = {f"--{kind}": getattr(args, kind)}
    inputs = {**folder, "--source": args.source, "--target": args.target, "--resume": args.resume}
    check_output_file(args.out, "--out", inputs)
    if args.checkpoint:  # may be the --resume file: a run resumed keeps writing its checkpoint
        check_output_file(
            args.checkpoint,
            "--checkpoint",
            {**folder, "--source": args.source, "--target": args.target, "--out": args.out},
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


def run(args) -> int:
    try:
        return _run(args)
    finally:
        finish()  # under torchrun: leave the group, also on the way out after an error


def _run(args) -> int:
    launch = check_launch(args, "pipeline" if args.pipeline else "model")  # lineas_fast.cli.launching
    max_length = check_args(args)
    source = read_sentences(args.source, "--source")
    target = read_sentences(args.target, "--target")
    ppl_texts = read_budget_texts(args, source, target)
    check_shares(launch, source, target, args.batch_size)
    resume = restart_resume(args, launch)  # after a torchrun restart: the run's --checkpoint
    if resume:
        check_checkpoint(resume, "--resume", train_config(args, max_length))
    start_job(args, launch)  # every rank arrives within --rendezvous-timeout, before the model loads
    # under torchrun with --fsdp only rank 0 reads the weights; the others get their shards from it
    model, tok = load_model_or_pipeline(args, on_meta=args.fsdp and launched() and not is_main())
    check_match_time(args.modules, "--modules", model)
    check_match_time(args.loss_modules, "--loss-modules", model)
    try:
        steering = train(
            model,
            tok,
            source,
            target,
            **train_settings(args, max_length),
            checkpoint_every=args.checkpoint_every,
            checkpoint_path=args.checkpoint,
            resume_from=resume,
            timestep=args.timestep,
            progress=interactive(),
            fsdp=args.fsdp,
        )
    except (ValueError, TypeError, OSError, DistributedError) as e:
        raise CLIError(flag_message(e, TRAIN_FLAGS)) from None
    finish()  # under torchrun: every rank holds the same maps; rank 0 writes them
    if not is_main():
        return 0
    steering.save(args.out, **calibrated_metadata(args, model, tok, steering, ppl_texts, max_length))
    hist = steering.metadata["history"]
    if hist:
        print(
            f"loss {hist[0]['loss']:.4g} -> {hist[-1]['loss']:.4g}, "
            f"support {steering.support()}/{sum(steering.dims().values())}"
        )
    print(f"wrote {args.out}")
    return 0
