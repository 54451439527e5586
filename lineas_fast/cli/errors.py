"""The command line's error type and its one-line form."""

from __future__ import annotations


class CLIError(Exception):
    """A user-facing problem with the arguments or files (printed without a traceback)."""


def one_line(message) -> str:
    """``message`` on one line (library messages may hold newlines)."""
    return " ".join(str(message).split()) or "unknown error"
