"""Module regexes given on the command line (``--modules``, ``--loss-modules``): checked for
backtracking blow-ups before any work, and matched under a time bound.

Python's ``re`` backtracks: a pattern such as ``(.|.)*Y`` or ``(a+)+`` takes time exponential in
the length of a module name it fails to match, and ``re`` holds the GIL, so a thread cannot stop
it. The rule, checked statically at parse time (``complexity_problem``):

1. no repeat inside a repeat: a group repeated by ``*``, ``+``, ``?``-less ``{m,n}`` (any
   quantifier allowing more than one pass) may not contain another such quantifier
   (``(a+)+``, ``(\\w*\\.)*``);
2. no alternation inside a repeat unless its branches start with distinct literal characters
   (``(.|.)*`` and ``(a|ab)*`` are refused, ``(q|k|v)+`` is allowed);
3. at most ``MAX_WILDCARDS`` (4) quantifiers that repeat a class or ``.`` (each adds a factor of
   the name's length to the worst case).

Within the rule a match can still be slow in odd cases, so ``check_match_time`` also matches the
pattern against the loaded model's module names in a child process killed after
``MATCH_SECONDS``; only then does the library match it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

try:  # Python >= 3.11
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover -- Python 3.10
    import sre_constants
    import sre_parse

MAX_WILDCARDS = 4
MATCH_SECONDS = 5.0
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT}
_POSSESSIVE = {getattr(sre_constants, "POSSESSIVE_REPEAT", None)} - {None}
_WIDE = {sre_constants.ANY, sre_constants.IN, sre_constants.CATEGORY, sre_constants.NOT_LITERAL}


def _first_literal(branch):
    """The literal character a branch must start with, or None."""
    for op, av in branch:
        if op == sre_constants.LITERAL:
            return av
        if op == sre_constants.SUBPATTERN:
            return _first_literal(av[-1])
        return None
    return None


def _walk(items, inside_repeat: bool, counts: dict) -> str | None:
    """The first rule broken in a parsed (sub)pattern, or None."""
    for op, av in items:
        if op in _REPEATS or op in _POSSESSIVE:
            low, high, body = av
            repeats = high is sre_constants.MAXREPEAT or high > 1
            if repeats and op not in _POSSESSIVE:
                if inside_repeat:
                    return "a repeat inside a repeat (e.g. (a+)+)"
                if any(o in _WIDE for o, _ in body):
                    counts["wide"] += 1
                why = _walk(body, True, counts)
            else:
                why = _walk(body, inside_repeat, counts)
            if why:
                return why
        elif op == sre_constants.BRANCH:
            branches = av[1]
            if inside_repeat:
                firsts = [_first_literal(b) for b in branches]
                if None in firsts or len(set(firsts)) < len(firsts):
                    return "an alternation inside a repeat whose branches can start alike (e.g. (.|.)*)"
            for b in branches:
                why = _walk(b, inside_repeat, counts)
                if why:
                    return why
        elif op == sre_constants.SUBPATTERN:
            why = _walk(av[-1], inside_repeat, counts)
            if why:
                return why
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            why = _walk(av[1], inside_repeat, counts)
            if why:
                return why
        elif op == sre_constants.GROUPREF_EXISTS:
            for b in av[1:]:
                if b is not None:
                    why = _walk(b, inside_repeat, counts)
                    if why:
                        return why
    return None


def complexity_problem(pattern: str) -> str | None:
    """Why ``pattern`` may backtrack for hours (the module rule above), or None."""
    counts = {"wide": 0}
    why = _walk(sre_parse.parse(pattern), False, counts)
    if why is None and counts["wide"] > MAX_WILDCARDS:
        why = f"{counts['wide']} repeated wildcards (at most {MAX_WILDCARDS})"
    return why


def regex(value: str) -> str:
    """argparse type: a valid, non-empty regular expression within the complexity rule."""
    if not value:
        raise argparse.ArgumentTypeError("expected a regular expression, got ''")
    try:
        re.compile(value)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a valid regular expression: {value!r} ({e})") from None
    why = complexity_problem(value)
    if why:
        raise argparse.ArgumentTypeError(
            f"{value!r} could backtrack for hours: {why}; write the alternatives out or use a "
            f"character class (see lineas_fast/cli/patterns.py)"
        )
    return value


regex.__name__ = "regex"

_MATCHER = (
    "import json, re, sys\n"
    "spec = json.load(sys.stdin)\n"
    "rx = re.compile(spec['pattern'])\n"
    "print(sum(1 for n in spec['names'] if rx.fullmatch(n)))\n"
)


def match_time_problem(pattern: str, names: list[str], seconds: float = MATCH_SECONDS) -> str | None:
    """None when ``re.fullmatch(pattern, name)`` over every name finishes within ``seconds`` (in a
    child process, killed at the limit), else why not."""
    try:
        subprocess.run(
            [sys.executable, "-I", "-c", _MATCHER],
            input=json.dumps({"pattern": pattern, "names": names}),
            capture_output=True,
            text=True,
            timeout=seconds,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return f"matching it against the {len(names)} module names took more than {seconds:g} s"
    except (OSError, subprocess.CalledProcessError):
        return None  # no child process here: the static rule stands alone
    return None
