"""``lineas-fast fuse``: write a steered checkpoint that plain transformers (or diffusers) loads;
with ``--gguf IN.gguf``, a steered GGUF file instead (``lineas_fast.cli.gguf``)."""

from __future__ import annotations

import json
import os

from lineas_fast._version import __version__
from lineas_fast.atomic import atomic_dir, recover
from lineas_fast.cli import gguf
from lineas_fast.cli.argtypes import real
from lineas_fast.cli.dtypes import add_dtype
from lineas_fast.cli.errors import CLIError, one_line
from lineas_fast.cli.folders import add_allow_missing, fits, load_model_or_pipeline, model_or_pipeline
from lineas_fast.cli.paths import check_output_dir, refuse_inputs
from lineas_fast.cli.readers import load_steering
from lineas_fast.fold.fusion import fuse
from lineas_fast.quiet import quiet_loading

NAME = "fuse"
HELP = "fold a steering into the weights and save a plain checkpoint"
DESCRIPTION = (
    "Fold the steering maps into the model's norms (and the biases of the linear layers reading "
    "them) and save a checkpoint that AutoModelForCausalLM.from_pretrained loads without lineas_fast."
)


def add_arguments(f) -> None:
    f.add_argument("--model", help="local transformers model folder")
    f.add_argument("--pipeline", help="local diffusers pipeline folder (instead of --model)")
    f.add_argument(
        "--gguf",
        default=None,
        metavar="IN.gguf",
        help="a GGUF model file (llama.cpp) instead of --model: writes a "
        "steered GGUF file to --out, quantized tensors untouched",
    )
    f.add_argument("--steering", required=True, help="steering file (.safetensors)")
    f.add_argument("--strength", type=real(), default=1.0, help="negative: fold the inverse map")
    f.add_argument(
        "--out", required=True, help="output folder (must be empty or absent); a .gguf file with --gguf"
    )
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    f.add_argument("--no-strict", action="store_true", help="skip the model-fingerprint check")
    f.add_argument(
        "--compose",
        action="store_true",
        help="fold on top of a model (or GGUF) that already carries a fold (refused otherwise)",
    )
    add_dtype(f)  # the folded checkpoint is written in this type (auto: the one it was read in)
    add_allow_missing(f)


def check_args(args) -> None:
    """Every check of ``fuse`` (folder form) that needs no model (a CLIError names the argument)."""
    kind = model_or_pipeline(args)
    inputs = {f"--{kind}": getattr(args, kind), "--steering": args.steering}
    if args.out and args.out != "-":
        refuse_inputs(args.out, "--out", inputs)  # before recover() touches anything there
    if os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        recover(args.out)  # a swap killed between its renames gets its old folder back
    check_output_dir(args.out, "--out", overwrite=args.overwrite, inputs=inputs)


def run(args) -> int:
    if args.gguf is not None:
        return gguf.run(args)
    check_args(args)
    steering = load_steering(args.steering)
    model, tok = load_model_or_pipeline(args)
    flag = "--model" if args.model else "--pipeline"
    fits(steering, model, args, flag)
    try:
        model = fuse(model, steering, strength=args.strength, strict=not args.no_strict, compose=args.compose)
    except (ValueError, TypeError) as e:  # FusionError is a ValueError
        raise CLIError(
            f"--steering {args.steering!r} cannot be folded into {flag} "
            f"{getattr(args, flag[2:])!r}: {one_line(e)}"
        ) from None
    with quiet_loading():
        write_checkpoint(model, tok, args.out, steering, args.strength, args.steering, args.overwrite)
    dtype = str(getattr(model, "unet", model).dtype).replace("torch.", "")  # as written
    print(f"wrote {args.out} ({type(model).__name__}, {dtype}, strength {args.strength})")
    return 0


def write_checkpoint(
    model, tokenizer, out: str, steering, strength: float, source: str, overwrite: bool = True
) -> None:
    """save_pretrained (a model or a diffusers pipeline), the tokenizer and the model card into a
    temporary sibling folder, then swap it in for ``out`` (``atomic.atomic_dir``): ``out`` is at
    every moment the old complete folder or the new one; a failed, interrupted (Ctrl-C, SIGTERM)
    or killed write leaves the old folder and no temporary behind (a SIGKILLed one's temporary is
    removed by the next write). Without ``overwrite`` the folder must still be new (or empty)
    when the write completes: a concurrent writer that got there first wins, this one fails."""
    with atomic_dir(out, exclusive=not overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(model, steering, strength, source))


def model_card(model, steering, strength: float, source: str) -> str:
    kind = "inverse map (induces the concept)" if strength < 0 else "map (removes the concept)"
    mods = "\n".join(f"- `{m}`" for m in steering.modules)
    shown_metadata = {k: v for k, v in steering.metadata.items() if k != "history"}
    return (
        f"# Steered checkpoint (lineas_fast {__version__})\n\n"
        f"Folded the LinEAS {kind} from `{os.path.basename(source)}` with strength "
        f"{abs(strength)} into the weights of {len(steering)} modules. The architecture is "
        f"`{type(model).__name__}`; it loads with plain transformers (or diffusers) and runs at the "
        f"unsteered model's cost.\n\nSupport: {steering.support()} of "
        f"{sum(steering.dims().values())} coordinates.\n\nSteering metadata:\n\n```json\n"
        f"{json.dumps(shown_metadata, indent=1, default=str)}\n"
        f"```\n\nModules:\n{mods}\n"
    )
