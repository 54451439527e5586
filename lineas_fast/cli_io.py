"""What the command line reads (sentence files, model and pipeline folders) and its error type.

Every problem found here is a ``CLIError``: ``lineas-fast`` prints it in one line and exits 2.
"""
from __future__ import annotations

import json
import os


class CLIError(Exception):
    """A user-facing problem with the arguments or files (printed without a traceback)."""


def read_sentences(path: str, what: str) -> list[str]:
    """One sentence per line (blank lines skipped), or JSONL with a "text" field (or strings)."""
    if not os.path.isfile(path):
        raise CLIError(f"{what} file {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CLIError(f"{path}:{i}: not valid JSON ({e})") from None
                text = obj.get("text") if isinstance(obj, dict) else obj
                if not isinstance(text, str):
                    raise CLIError(f"{path}:{i}: expected a string or an object with \"text\"")
                out.append(text)
            else:
                out.append(line)
    if not out:
        raise CLIError(f"{what} file {path!r} holds no sentences")
    return out


def load_model(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.isdir(path):
        raise CLIError(f"model folder {path!r} does not exist (a local transformers folder)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load a causal LM from {path!r}: {e}") from None
    model.eval()
    return model, tok


def load_pipeline(path: str):
    if not os.path.isdir(path):
        raise CLIError(f"pipeline folder {path!r} does not exist (a local diffusers folder)")
    try:
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(path)
    except ImportError:
        raise CLIError("diffusers is not installed: pip install -e '.[diffusers]'") from None
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load a diffusers pipeline from {path!r}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_model_or_pipeline(args):
    """(model, tokenizer) from --model, or (pipeline, None) from --pipeline: exactly one."""
    if bool(args.model) == bool(args.pipeline):
        raise CLIError("give exactly one of --model (a causal LM) or --pipeline (diffusers)")
    if args.pipeline:
        return load_pipeline(args.pipeline), None
    return load_model(args.model)
