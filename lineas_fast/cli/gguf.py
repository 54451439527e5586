"""``lineas-fast fuse --gguf IN.gguf --steering S --strength λ --out OUT.gguf``: a steered GGUF
file for llama.cpp / Ollama, quantized weights copied byte for byte (``gguf_fold.fuse_gguf``)."""

from __future__ import annotations

import os


def add_gguf_to_fuse(fuse_parser) -> None:
    """Give the ``fuse`` subcommand its ``--gguf`` form (dispatching to ``cmd_fuse_gguf``)."""
    fuse_parser.add_argument(
        "--gguf",
        default=None,
        metavar="IN.gguf",
        help="a GGUF model file (llama.cpp) instead of --model: writes a "
        "steered GGUF file to --out, quantized tensors untouched",
    )
    folder_cmd = fuse_parser.get_default("func")

    def dispatch(args) -> int:
        return cmd_fuse_gguf(args) if args.gguf is not None else folder_cmd(args)

    fuse_parser.set_defaults(func=dispatch)


def check_fuse_gguf_args(args) -> None:
    """Every check of ``fuse --gguf`` that needs no model file read (CLIError names the flag)."""
    from lineas_fast.cli.common import CLIError, check_input_file, check_output_file

    given = [f for f in ("model", "pipeline") if getattr(args, f, None) is not None]
    if given:
        raise CLIError(
            f"--gguf {args.gguf!r} and --{given[0]} {getattr(args, given[0])!r}: give "
            f"one model (--gguf FILE for a GGUF file, --model DIR for a folder)"
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


def cmd_fuse_gguf(args) -> int:
    from lineas_fast.cli.common import CLIError, load_steering, one_line

    check_fuse_gguf_args(args)
    steering = load_steering(args.steering)
    try:
        import gguf  # noqa: F401 -- the reader and writer

        from lineas_fast.fold.gguf import fuse_gguf
    except ImportError:
        raise CLIError("--gguf needs the `gguf` package: pip install gguf") from None
    try:
        report = fuse_gguf(args.gguf, steering, args.strength, args.out, strict=not args.no_strict)
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
