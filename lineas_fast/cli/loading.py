"""Model folders load completely or not at all: the tensors a folder's config asks for and the
tensors its weight files hold must agree.

``transformers`` (and ``diffusers``) fill a tensor missing from the weight files with a random
initialisation and skip an unexpected one, with only a log line the command line silences; a
config with one more layer than its weights would then train, fold and ship a random layer.
Here every model is loaded with ``output_loading_info=True`` (``ignore_mismatched_sizes=True``
so that a tensor of the wrong shape is reported by name rather than as a bare error), and any
missing, unexpected or mismatched tensor is a ``CLIError`` naming them, unless the user passes
``--allow-missing-weights``. A diffusers pipeline's model components (the UNet, the VAE, the
text encoder) are each loaded this way and handed to ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import importlib
import json
import os

from lineas_fast.cli.errors import CLIError
from lineas_fast.quiet import quiet_loading

ALLOW_FLAG = "--allow-missing-weights"


def _names(values) -> list[str]:
    """Tensor names from a loading report's entries (names, or (name, shape, shape) tuples)."""
    return sorted(str(v[0] if isinstance(v, (tuple, list)) else v) for v in values)


def loading_problems(info: dict) -> str | None:
    """What a ``from_pretrained(..., output_loading_info=True)`` report says is wrong, or None."""
    parts = []
    for key, what in (
        ("missing_keys", "missing from the weight files (would be randomly initialised)"),
        ("unexpected_keys", "in the weight files but not in the model its config describes"),
        ("mismatched_keys", "of another shape in the weight files than in the config's model"),
    ):
        names = _names(info.get(key) or ())
        if names:
            more = f" and {len(names) - 6} more" if len(names) > 6 else ""
            parts.append(f"{len(names)} tensor(s) {what}: {', '.join(names[:6])}{more}")
    errors = [str(e) for e in info.get("error_msgs") or ()]
    if errors:
        parts.append(f"loading errors: {'; '.join(errors)[:300]}")
    return "; ".join(parts) or None


def refuse_incomplete(info: dict, flag: str, path: str, allow: bool) -> None:
    """A ``CLIError`` naming the tensors when the report ``info`` of ``path`` is not clean (unless
    ``allow``: ``--allow-missing-weights``)."""
    why = loading_problems(info)
    if why and not allow:
        raise CLIError(
            f"{flag} {path!r} does not load completely: {why}; its config.json and its weights "
            f"disagree (pass {ALLOW_FLAG} to load it anyway)"
        )


def _model_bases() -> tuple:
    """The model base classes of transformers and (when installed) diffusers."""
    bases = []
    for library, base in (("transformers", "PreTrainedModel"), ("diffusers", "ModelMixin")):
        try:
            bases.append(getattr(importlib.import_module(library), base))
        except (ImportError, AttributeError):  # diffusers is optional
            continue
    return tuple(bases)


def model_components(path: str) -> dict:
    """{component name: model class} for the model components (``ModelMixin`` or
    ``PreTrainedModel`` subclasses) that a pipeline folder's model_index.json lists."""
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    bases = _model_bases()
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or None in spec:
            continue
        library, cls_name = spec
        try:
            cls = getattr(importlib.import_module(library), cls_name)
        except (ImportError, AttributeError, TypeError):
            continue
        if isinstance(cls, type) and issubclass(cls, bases) and os.path.isdir(os.path.join(path, name)):
            out[name] = cls
    return out


def load_components(path: str, flag: str, allow: bool, dtype=None) -> dict:
    """{name: loaded component} for a pipeline folder's model components, each loaded (in the
    torch ``dtype`` when given) with its loading report checked."""
    loaded = {}
    for name, cls in model_components(path).items():
        # transformers reports a tensor of another shape by name with ignore_mismatched_sizes;
        # diffusers raises naming it
        transformers = issubclass(cls, _model_bases()[0])
        kwargs = {"ignore_mismatched_sizes": True} if transformers else {}
        if dtype is not None:
            kwargs["dtype" if transformers else "torch_dtype"] = dtype
        folder = os.path.join(path, name)
        with quiet_loading():
            component, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
        refuse_incomplete(info, flag, path, allow)
        loaded[name] = component
    return loaded
