"""Quiet folder reads and writes: transformers' and diffusers' log warnings and Python warnings
silenced, and their progress bars off unless stderr is a terminal (used by the command line, so
a failing command's stderr is its one error line, and by ``serve.bench`` around its reload)."""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings


def interactive() -> bool:
    """Whether stderr is a terminal (progress bars only then: logs and pipes keep stderr for the
    error line)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def quiet_loading():
    """While a folder is read or written: transformers' and diffusers' log warnings (e.g. an
    optional backend not installed) and Python warnings silenced, their progress bars off unless
    stderr is a terminal; everything restored afterwards."""
    undo = []
    for name in ("transformers", "diffusers"):
        try:  # diffusers is optional
            logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        undo.append(lambda logging=logging, level=level: logging.set_verbosity(level))
        if logging.is_progress_bar_enabled() and not interactive():
            logging.disable_progress_bar()
            undo.append(logging.enable_progress_bar)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for restore in reversed(undo):
            restore()
