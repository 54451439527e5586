"""The ``--gguf`` form of ``lineas-fast fuse`` (``fuse --gguf IN.gguf --steering S --strength λ
--out OUT.gguf``): a steered GGUF file for llama.cpp / Ollama, quantized weights copied byte for
byte (``lineas_fast.fold.gguf.fuse_gguf``). A helper of ``cli.fuse``, not a subcommand."""

from __future__ import annotations

import os

from lineas_fast.cli.errors import CLIError, one_line
from lineas_fast.cli.paths import check_input_file, check_output_file
from lineas_fast.cli.readers import load_steering
from lineas_fast.extras import install_hint, missing
from lineas_fast.fold.gguf import fuse_gguf


def check_args(args) -> None:
    """Every check of ``fuse --gguf`` that needs no model file read (a CLIError names the flag)."""
    given = [f for f in ("model", "pipeline") if getattr(args, f, None) is not None]
    if given:
        raise CLIError(
            f"--gguf {args.gguf!r} and --{given[0]} {getattr(args, given[0])!r}: give "
            f"one model (--gguf FILE for a GGUF file, --model DIR for a folder)"
        )
    if getattr(args, "dtype", None) is not None:
        raise CLIError(
            f"--dtype {args.dtype} applies to --model and --pipeline folders; with --gguf every tensor "
            f"keeps its type in the file (folded norms and biases are written in float32)"
        )
    check_input_file(args.gguf, "--gguf")
    inputs = {"--gguf": args.gguf, "--steering": args.steering}
    check_output_file(args.out, "--out", inputs, suffix=".gguf")
    if os.path.lexists(args.out) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists; pass --overwrite to replace it")
    with open(args.gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CLIError(f"--gguf {args.gguf!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def run(args) -> int:
    check_args(args)
    steering = load_steering(args.steering)
    if missing("gguf"):  # the optional reader and writer
        raise CLIError(f"--gguf needs the 'gguf' package, which is not installed: {install_hint('gguf')}")
    try:
        report = fuse_gguf(
            args.gguf, steering, args.strength, args.out, strict=not args.no_strict, compose=args.compose
        )
    except (ValueError, TypeError) as e:  # FusionError is a ValueError
        raise CLIError(
            f"--steering {args.steering!r} cannot be folded into --gguf {args.gguf!r}: {one_line(e)}"
        ) from None
    print(
        f"wrote {args.out} ({report['arch']}, strength {args.strength}: "
        f"{len(report['scaled'])} norm weights scaled, {len(report['biases'])} bias tensors, "
        f"{report['copied']} tensors copied byte for byte)"
    )
    return 0
