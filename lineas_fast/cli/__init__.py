"""Command line: ``lineas-fast train | generate | fuse [--gguf] | bench | generate-image | demo |
sweep`` (also ``python -m lineas_fast`` and ``python -m lineas_fast.cli``; ``--version`` prints
the version).

Each subcommand is one module of this package listed in ``COMMANDS``, with the same interface:
``NAME`` (the subcommand), ``HELP`` (its line in ``lineas-fast --help``), ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> int``; what they share is split by concern:
``cli.argtypes`` (the parser, argument types), ``cli.paths`` (outputs and inputs),
``cli.readers`` (sentence, steering and checkpoint files), ``cli.folders`` (model and pipeline
folders), ``cli.dtypes`` (``--dtype``), ``cli.errors`` (``CLIError``); ``cli.common`` re-exports
them for code that imports them from there.

Contract: a user error (a bad value, a missing or malformed file, an output that cannot be
written, a library ``ValueError``/``TypeError``/``OSError``/``FusionError``/
``TrainingDivergedError``) exits with status 2 and one line on stderr,
``lineas-fast <command>: error: ...``, naming the argument, the value and what is expected;
every check that needs no model runs before a model is loaded or a step is trained, and no
output is written by a failing command. Status 1 is for bugs (a short message; set
``LINEAS_FAST_TRACEBACK=1`` for the traceback); 130 for Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import traceback

from lineas_fast._version import __version__
from lineas_fast.cli import bench, demo, fuse, generate, generate_image, sweep, train
from lineas_fast.cli.argtypes import ArgumentParser, SubcommandParser
from lineas_fast.cli.errors import CLIError, one_line
from lineas_fast.extras import MissingExtraError
from lineas_fast.fold.fusion import FusionError
from lineas_fast.training.trainer import TrainingDivergedError

# the subcommands, in the order ``--help`` lists them
COMMANDS = (train, generate, fuse, bench, generate_image, demo, sweep)
# MissingExtraError: an optional package that the command needs is not installed (named, with pip)
USER_ERRORS = (ValueError, TypeError, OSError, FusionError, TrainingDivergedError, MissingExtraError)


def build_parser() -> ArgumentParser:
    """The ``lineas-fast`` parser: one subparser per module of ``COMMANDS``."""
    ap = ArgumentParser(
        prog="lineas-fast", description="Fast LinEAS activation steering.", allow_abbrev=False
    )
    ap.add_argument("--version", action="version", version=f"lineas-fast {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    for command in COMMANDS:
        p = sub.add_parser(
            command.NAME, help=command.HELP, description=command.DESCRIPTION, allow_abbrev=False
        )
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return ap


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2: user error, 1: bug)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2)
        return e.code if isinstance(e.code, int) else 2
    prefix = f"lineas-fast {args.command}"
    try:
        return args.run(args)
    except (CLIError, *USER_ERRORS) as e:
        print(f"{prefix}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- anything else is a bug
        if os.environ.get("LINEAS_FAST_TRACEBACK"):
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
