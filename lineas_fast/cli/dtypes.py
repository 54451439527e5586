"""``--dtype``: the floating type a command loads its model in.

``auto`` (the default) keeps the checkpoint's own type, so that a bfloat16 model trains, steers
and folds as bfloat16 and ``fuse`` writes a checkpoint of the size it read:

* a transformers folder: the ``dtype`` (older: ``torch_dtype``) its config.json names, float32
  when it names none; a config naming a type the command line does not load (float64, a
  quantized type) is refused with auto (give ``--dtype``);
* a diffusers pipeline (whose configs record no type): the floating type most of its UNet's
  stored weights have (read from the safetensors header, no tensor read), float32 when there
  is no such file.

``float32``, ``bfloat16`` and ``float16`` load every floating weight in that type. Steering
maps stay float32 whatever the model's type (the trainer keeps them so). On a CPU, float16 runs
but slowly (most CPUs have no fast float16 arithmetic): prefer bfloat16 or float32 there.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

from lineas_fast.cli.errors import CLIError, one_line
from lineas_fast.untrusted import safetensors_header

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOADABLE = DTYPES[1:]
# safetensors dtype names -> ours
_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def add_dtype(parser) -> None:
    """The ``--dtype`` option of a command that loads a model (None when not given: auto)."""
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="floating type to load the model in (default auto: the checkpoint's own, from its "
        "config.json; float32 when it names none)",
    )


def config_dtype(path: str, flag: str = "--model") -> str:
    """The type a transformers folder's config.json names (``dtype`` or ``torch_dtype``),
    "float32" when it names none; a CLIError naming ``flag`` for one this command cannot load."""
    config = os.path.join(path, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        why = f"{type(e).__name__}: {one_line(e)}"
        raise CLIError(f"{flag} {path!r}: cannot read its config.json ({why})") from None
    named = cfg.get("dtype", cfg.get("torch_dtype")) if isinstance(cfg, dict) else None
    if named is None:
        return "float32"
    name = str(named).removeprefix("torch.")
    if name not in LOADABLE:
        raise CLIError(
            f"--dtype auto: {flag} {path!r} names dtype {named!r} in its config.json, which "
            f"lineas-fast does not load; give --dtype {'|'.join(LOADABLE)}"
        )
    return name


def pipeline_dtype(path: str) -> str:
    """The floating type most of a diffusers pipeline's UNet weights are stored in (safetensors
    headers only), "float32" when there are none."""
    counts: Counter = Counter()
    for file in sorted(glob.glob(os.path.join(path, "unet", "*.safetensors"))):
        try:
            header = safetensors_header(file)
        except (OSError, ValueError):
            continue  # the loader names a broken file
        counts.update(_STORED[t.dtype] for t in header.tensors.values() if t.dtype in _STORED)
    return counts.most_common(1)[0][0] if counts else "float32"


def resolve_dtype(given: str | None, path: str, kind: str = "model") -> str:
    """The type to load the ``kind`` ("model" or "pipeline") folder ``path`` in, for the value
    ``given`` to --dtype (None: auto)."""
    if given not in (None, "auto"):
        return given
    return pipeline_dtype(path) if kind == "pipeline" else config_dtype(path, f"--{kind}")
