"""The command line's parser and argument types: argparse with one-line errors, options given
once and in full, negative numbers in every notation as values; finite numbers in a range,
integers in a range, non-blank texts; and a library error's message named by the flag that sets
its argument (``flag_message``)."""

from __future__ import annotations

import argparse
import math
import re

from lineas_fast.cli.errors import one_line

# a negative number in any float notation (-1, -.5, -1., -1e-3, -1E+40, -inf, -nan) is a value,
# never an option (argparse's own rule knows only -1 and -.5)
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*(e[-+]?\d+)?|\.\d+(e[-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)
# the actions an option may be given once for (append and count actions collect repeats)
_ONCE = (
    argparse._StoreAction,
    argparse._StoreConstAction,
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
)


class _GivenOnce:
    """Mixed into a store action: the second time its option is given is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given_options", set())
        if self.dest in given:
            parser.error(f"{option_string} given twice (give each option once)")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block), status 2; negative numbers
    in every notation are values; an option given twice is an error (append options excepted);
    options are never abbreviated (``allow_abbrev=False``: ``--no`` is not ``--no-strict``)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and isinstance(action, _ONCE) and not isinstance(action, _GivenOnce):
            action.__class__ = type(f"Once{type(action).__name__}", (_GivenOnce, type(action)), {})
        return action

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        parsed.__dict__.pop("_given_options", None)
        return parsed, rest

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class SubcommandParser(ArgumentParser):
    """A subcommand's parser: an argument it does not know is its own error (``lineas-fast
    generate: error: unrecognized arguments: --no``), not left for the top-level parser."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        return parsed, rest


# --- argument types (checked by argparse while parsing) ------------------------------------------
def _range_text(low, high, low_open):
    def show(v):
        return str(v) if isinstance(v, int) else f"{v:g}"

    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {show(low)}")
    if high is not None:
        parts.append(f"<= {show(high)}")
    return " " + " and ".join(parts) if parts else ""


def real(low: float | None = None, high: float | None = None, low_open: bool = False):
    """argparse type: a finite float in the range (NaN and Inf are refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid float value: {text!r} (expected a number{_range_text(low, high, low_open)})"
            ) from None
        bad = (
            not math.isfinite(value)
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and value > high)
        )
        if bad:
            raise argparse.ArgumentTypeError(
                f"expected a finite number{_range_text(low, high, low_open)}, got {text!r}"
            )
        return value

    parse.__name__ = "float"
    return parse


def integer(low: int | None = None, high: int | None = None):
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid int value: {text!r} (expected an integer{_range_text(low, high, False)})"
            ) from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"expected an integer{_range_text(low, high, False)}, got {text!r}"
            )
        return value

    parse.__name__ = "int"
    return parse


def nonblank(value: str) -> str:
    """argparse type: a non-blank string (prompts)."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty text, got {value!r}")
    return value


SEED = integer(0, 2**63 - 1)


def flag_message(error: Exception, flags: dict) -> str:
    """A library error's message on one line, prefixed with the command-line flag that sets the
    library argument it is about (``error.argument``, set by ``lineas_fast.checks.ArgumentError``
    and ``ArgumentTypeError``; ``flags``: {library argument: flag}); unchanged when the error
    names no argument or one the command has no flag for."""
    message = one_line(error)
    flag = flags.get(getattr(error, "argument", None))
    if flag is None or message.startswith(flag):
        return message
    return f"{flag}: {message}"
