"""``lineas-fast fuse``: write a steered checkpoint that plain transformers loads."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from .io import default_mode


def add_fuse_parser(sub) -> None:
    f = sub.add_parser("fuse", help="fold a steering into the weights and save a plain checkpoint",
                       description="Fold the steering maps into the model's norms (and the biases "
                                   "of the linear layers reading them) and save a checkpoint that "
                                   "AutoModelForCausalLM.from_pretrained loads without lineas_fast.")
    f.add_argument("--model", help="local transformers model folder")
    f.add_argument("--pipeline", help="local diffusers pipeline folder (instead of --model)")
    f.add_argument("--steering", required=True, help="steering file (.safetensors)")
    f.add_argument("--strength", type=float, default=1.0, help="negative: fold the inverse map")
    f.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    f.add_argument("--no-strict", action="store_true", help="skip the model-fingerprint check")
    f.set_defaults(func=cmd_fuse)


def cmd_fuse(args) -> int:
    import lineas_fast as lf
    from .cli_io import CLIError
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise CLIError(f"output folder {args.out!r} is not empty; pass --overwrite to replace it")
    from .cli_io import load_model_or_pipeline
    model, tok = load_model_or_pipeline(args)
    try:
        steering = lf.Steering.load(args.steering)
        steering.validate(model, strict=not args.no_strict)
        model = lf.fuse(model, steering, strength=args.strength)
    except (FileNotFoundError, ValueError) as e:      # FusionError is a ValueError
        raise CLIError(str(e)) from None
    write_checkpoint(model, tok, args.out, steering, args.strength, args.steering)
    print(f"wrote {args.out} ({type(model).__name__}, strength {args.strength})")
    return 0


def write_checkpoint(model, tokenizer, out: str, steering, strength: float, source: str) -> None:
    """save_pretrained (a model or a diffusers pipeline) into a temporary sibling folder, then
    move it into place."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fuse-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(model, steering, strength, source))
        os.chmod(tmp, default_mode(directory=True))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def model_card(model, steering, strength: float, source: str) -> str:
    from ._version import __version__
    kind = "inverse map (induces the concept)" if strength < 0 else "map (removes the concept)"
    mods = "\n".join(f"- `{m}`" for m in steering.modules)
    return (f"# Steered checkpoint (lineas_fast {__version__})\n\n"
            f"Folded the LinEAS {kind} from `{os.path.basename(source)}` with strength "
            f"{abs(strength)} into the weights of {len(steering)} modules. The architecture is "
            f"`{type(model).__name__}`; it loads with plain transformers (or diffusers) and runs at the "
            f"unsteered model's cost.\n\nSupport: {steering.support()} of "
            f"{sum(steering.dims().values())} coordinates.\n\nSteering metadata:\n\n```json\n"
            f"{json.dumps({k: v for k, v in steering.metadata.items() if k != 'history'}, indent=1, default=str)}\n"
            f"```\n\nModules:\n{mods}\n")
