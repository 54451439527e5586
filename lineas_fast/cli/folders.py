"""Model and pipeline folders on the command line: checked (a local transformers or diffusers
folder, the other kind named with its flag), their configs read without weights (positions,
scheduler timesteps), loaded completely in the ``--dtype`` asked for, and checked against a
steering (``fits``) and the module regexes (``check_match_time``)."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lineas_fast.cli.dtypes import resolve_dtype
from lineas_fast.cli.errors import CLIError, one_line
from lineas_fast.cli.loading import ALLOW_FLAG, load_components, refuse_incomplete
from lineas_fast.cli.patterns import match_time_problem
from lineas_fast.extras import MissingExtraError, install_hint, missing, require
from lineas_fast.quiet import quiet_loading

# kind: (the file that marks its folder, what the folder is, how "does not exist" names it)
_FOLDERS = {
    "model": ("config.json", "transformers model", "transformers model"),
    "pipeline": ("model_index.json", "diffusers pipeline", "diffusers"),
}


def _check_folder(path: str, flag: str, kind: str) -> None:
    """A local folder of ``kind``; a folder of the other kind is named with the flag it needs."""
    marker, what, expected = _FOLDERS[kind]
    other = "pipeline" if kind == "model" else "model"
    if not path:
        raise CLIError(f"{flag}: expected a folder path, got ''")
    if not os.path.exists(path):
        raise CLIError(f"{flag} folder {path!r} does not exist (expected a local {expected} folder)")
    if not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a file; expected a local {what} folder")
    if not os.path.isfile(os.path.join(path, marker)):
        if os.path.isfile(os.path.join(path, _FOLDERS[other][0])):
            raise CLIError(f"{flag} {path!r} is a {_FOLDERS[other][1]} folder; use --{other}")
        raise CLIError(f"{flag} {path!r} is not a {what} folder (no {marker})")


def check_model_dir(path: str, flag: str = "--model") -> None:
    """A local transformers model folder (holds config.json)."""
    _check_folder(path, flag, "model")


def check_pipeline_dir(path: str, flag: str = "--pipeline") -> None:
    """A local diffusers pipeline folder (holds model_index.json)."""
    _check_folder(path, flag, "pipeline")


def model_or_pipeline(args) -> str:
    """Which of --model / --pipeline was given (exactly one), its folder checked."""
    if (args.model is None) == (args.pipeline is None):
        given = "neither" if args.model is None else "both"
        raise CLIError(
            f"give exactly one of --model DIR (a causal LM) or --pipeline DIR (diffusers); got {given}"
        )
    if args.pipeline is not None:
        check_pipeline_dir(args.pipeline)
        return "pipeline"
    check_model_dir(args.model)
    return "model"


def model_positions(path: str, flag: str = "--model") -> int | None:
    """The model's max_position_embeddings from its config (no weights read), None if unset."""
    try:
        with quiet_loading():
            cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- a broken config.json is the user's file
        raise CLIError(
            f"{flag} {path!r}: cannot read its config.json ({type(e).__name__}: {one_line(e)})"
        ) from None
    positions = getattr(cfg, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def scheduler_timesteps(path: str) -> int | None:
    """The pipeline scheduler's num_train_timesteps from its config (None if unreadable)."""
    try:
        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            value = json.load(f).get("num_train_timesteps", 1000)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def load_tokenizer(path: str, flag: str = "--model"):
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- a broken folder is the user's input
        raise CLIError(
            f"{flag} {path!r}: cannot load its tokenizer ({type(e).__name__}: {one_line(e)})"
        ) from None


def load_model(
    path: str, dtype: str | None = "auto", tokenizer=None, allow_missing: bool = False, on_meta: bool = False
):
    """(model, tokenizer) from a local transformers causal LM folder, loaded completely: a tensor
    missing from its weight files, unexpected or of another shape is a CLIError naming it unless
    ``allow_missing`` (``--allow-missing-weights``; ``cli.loading``). ``dtype``: a ``--dtype``
    value (None or "auto": the checkpoint's own, ``cli.dtypes``). ``on_meta``: built from its
    config on the meta device in that dtype, no weights read (a rank of ``train --fsdp`` other
    than 0, whose shards come from rank 0)."""
    check_model_dir(path)
    dtype = resolve_dtype(dtype, path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    if on_meta:
        try:
            with quiet_loading(), torch.device("meta"):
                config = AutoConfig.from_pretrained(path)
                model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        except Exception as e:  # noqa: BLE001 -- a broken folder is the user's input
            raise CLIError(
                f"--model {path!r}: cannot build a causal LM from its config "
                f"({type(e).__name__}: {one_line(e)})"
            ) from None
        return model.eval(), tok
    try:
        with quiet_loading():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), output_loading_info=True, ignore_mismatched_sizes=True
            )
    except Exception as e:  # noqa: BLE001 -- a broken folder is the user's input
        raise CLIError(
            f"--model {path!r}: cannot load a causal LM from it ({type(e).__name__}: {one_line(e)})"
        ) from None
    refuse_incomplete(info, "--model", path, allow_missing)
    model.eval()
    return model, tok


def load_pipeline(path: str, allow_missing: bool = False, dtype: str | None = "auto"):
    """A local diffusers text-to-image pipeline, its model components loaded completely (as
    ``load_model``) in ``dtype`` (a ``--dtype`` value; auto: the UNet's stored type)."""
    check_pipeline_dir(path)
    torch_dtype = getattr(torch, resolve_dtype(dtype, path, "pipeline"))
    try:
        DiffusionPipeline = require("diffusers", "--pipeline").DiffusionPipeline  # optional, heavy
    except MissingExtraError as e:
        raise CLIError(f"--pipeline {path!r}: {e}") from None
    try:
        components = load_components(path, "--pipeline", allow_missing, torch_dtype)
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(path, **components, torch_dtype=torch_dtype)
    except CLIError:
        raise
    except Exception as e:  # noqa: BLE001 -- a broken folder is the user's input
        raise CLIError(
            f"--pipeline {path!r}: cannot load a diffusers pipeline from it "
            f"({type(e).__name__}: {one_line(e)})"
        ) from None
    if not hasattr(pipe, "unet") or not hasattr(pipe, "components"):
        raise CLIError(
            f"--pipeline {path!r}: {type(pipe).__name__} has no UNet; expected a "
            f"text-to-image pipeline (Stable Diffusion, SDXL)"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_model_or_pipeline(args, on_meta: bool = False):
    """(model, tokenizer) from --model, or (pipeline, None) from --pipeline: exactly one, in the
    type ``--dtype`` asks for (``args.dtype``; auto: the checkpoint's own). ``on_meta``: the
    model built on the meta device (``load_model``)."""
    allow = getattr(args, "allow_missing_weights", False)
    dtype = getattr(args, "dtype", None)
    if model_or_pipeline(args) == "pipeline":
        return load_pipeline(args.pipeline, allow, dtype), None
    return load_model(args.model, dtype, allow_missing=allow, on_meta=on_meta)


def add_allow_missing(parser) -> None:
    """The ``--allow-missing-weights`` flag of a command that loads a model folder."""
    parser.add_argument(
        ALLOW_FLAG,
        action="store_true",
        help="load a model folder whose weights miss, add or reshape tensors of its config "
        "(they are randomly initialised); default: refuse it, naming the tensors",
    )


def check_match_time(pattern: str | None, flag: str, model) -> None:
    """``pattern`` matches the model's module names within ``patterns.MATCH_SECONDS`` (a CLIError
    naming the flag otherwise), before the library matches it in this process."""
    if not pattern:
        return
    root = getattr(model, "unet", model)  # a pipeline's steering reads its UNet
    why = match_time_problem(pattern, [n for n, _ in root.named_modules() if n])
    if why:
        raise CLIError(f"{flag} {pattern!r}: {why}; simplify the pattern")


def fits(steering, model, args, flag: str = "--model") -> None:
    """The steering file's maps fit the loaded model (a CLIError names both; a fingerprint
    mismatch says which flag skips that check)."""
    try:
        steering.validate(model, strict=not getattr(args, "no_strict", False))
    except (ValueError, TypeError) as e:
        fingerprint = getattr(e, "argument", None) == "strict"
        hint = " (give --no-strict to skip the fingerprint check)" if fingerprint else ""
        raise CLIError(
            f"--steering {args.steering!r} does not fit {flag} "
            f"{getattr(args, flag[2:])!r}: {one_line(e)}{hint}"
        ) from None


def need_matplotlib(command: str) -> None:
    """``command`` draws its plots with matplotlib: refuse before any work when it is missing."""
    if missing("matplotlib"):
        raise CLIError(
            f"{command} draws its plots with matplotlib, which is not installed: "
            f"{install_hint('matplotlib')}; nothing was run"
        )
