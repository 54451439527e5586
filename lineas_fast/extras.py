"""Optional packages, imported only by the features that need them; a missing one is a
``MissingExtraError`` naming the feature, the pip package and the lineas_fast extra that installs
it, never a bare ``ModuleNotFoundError``.

    import name        pip package             extra
    matplotlib         matplotlib              demo      (plots: plot_support, demo, sweep)
    diffusers          diffusers               diffusers (pipelines on the command line)
    PIL                pillow                  diffusers (image grids)
    gguf               gguf                    gguf      (lf.fuse_gguf, fuse --gguf)
    profanity_check    alt-profanity-check     demo      (the toxicity judge of demo and sweep)
    accelerate         accelerate              demo      (reading the demo's GGUF models)
"""

from __future__ import annotations

import importlib
import importlib.util

# import name -> (pip package, lineas_fast extra)
EXTRAS = {
    "matplotlib": ("matplotlib", "demo"),
    "diffusers": ("diffusers", "diffusers"),
    "PIL": ("pillow", "diffusers"),
    "gguf": ("gguf", "gguf"),
    "profanity_check": ("alt-profanity-check", "demo"),
    "accelerate": ("accelerate", "demo"),
}


class MissingExtraError(ImportError):
    """An optional package that a feature needs cannot be imported. ``package``: what to
    ``pip install``; ``extra``: the lineas_fast extra that holds it."""

    def __init__(self, message: str, package: str, extra: str, module: str):
        super().__init__(message, name=module)
        self.package, self.extra = package, extra


def install_hint(module: str) -> str:
    """``pip install PACKAGE (or pip install 'lineas_fast[EXTRA]')`` for an optional module."""
    package, extra = EXTRAS[module.split(".")[0]]
    return f"pip install {package} (or pip install 'lineas_fast[{extra}]')"


def missing(module: str) -> bool:
    """True when the optional ``module`` is not installed (nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return True


def require(module: str, feature: str):
    """The optional ``module``, imported; a ``MissingExtraError`` saying that ``feature`` needs
    it and how to install it when it is missing or broken (a package of its own missing)."""
    top = module.split(".")[0]
    package, extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is None or e.name.split(".")[0] == top:
            why = f"which is not installed: {install_hint(top)}"
        else:  # installed, but one of its own dependencies is missing
            why = (
                f"which is installed but cannot be imported ({type(e).__name__}: {e}): reinstall "
                f"it with pip install --force-reinstall {package}"
            )
        message = f"{feature} needs the {package!r} package, {why}"
        raise MissingExtraError(message, package, extra, top) from None


def pyplot(feature: str):
    """matplotlib.pyplot on the non-interactive Agg backend (files only), for ``feature``."""
    require("matplotlib", feature).use("Agg")
    return require("matplotlib.pyplot", feature)
