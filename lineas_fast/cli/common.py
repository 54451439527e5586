"""What the command line checks and reads: argument values, sentence files, output paths,
model and pipeline folders, steering files and training checkpoints; and its error type.

Every problem found here is a ``CLIError``: ``lineas-fast`` prints it in one line and exits 2.
Everything here runs before a model is loaded or a step is trained.

Sentence files (``read_sentences``) are read by their content, whatever their extension:

1. the whole file is one JSON array whose items are all strings or objects with a string
   ``"text"``: those are the sentences;
2. else every non-blank line is a JSON string or a JSON object with a string ``"text"``: JSON
   lines;
3. else, if the name ends in ``.json`` / ``.jsonl`` or any line is a JSON object: an error naming
   the first line (file:line) that is not such a record (a JSON file with a broken line, or
   JSON lines with another key, are never read as plain text);
4. else plain text: one sentence per non-blank line, kept verbatim (a line that happens to be a
   quoted string stays quoted).

Files must be UTF-8 (a BOM is allowed; an invalid byte is reported with its offset), hold no
NUL byte and at least one sentence; an empty sentence in a JSON file is an error.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import re

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lineas_fast.atomic import file_kind, name_too_long
from lineas_fast.cli.dtypes import resolve_dtype
from lineas_fast.cli.errors import CLIError, one_line
from lineas_fast.cli.loading import ALLOW_FLAG, load_components, refuse_incomplete
from lineas_fast.cli.patterns import match_time_problem, regex
from lineas_fast.extras import MissingExtraError, install_hint, missing, require
from lineas_fast.quiet import interactive, quiet_loading
from lineas_fast.steering import Steering
from lineas_fast.training.checkpoints import CHECKPOINT_FORMAT

__all__ = ["CLIError", "interactive", "one_line", "quiet_loading", "regex"]  # re-exported


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


# --- paths ------------------------------------------------------------------------------------------
def _file_ids(folder: str, limit: int = 10000) -> set:
    """(device, inode) of the regular files under ``folder`` (at most ``limit`` entries seen)."""
    ids, seen = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            seen += 1
            if seen > limit:
                return ids
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            ids.add((st.st_dev, st.st_ino))
    return ids


def _overlap(out: str, value: str) -> str | None:
    """How output ``out`` would touch input ``value`` (a file or a folder): "is" (the same file or
    folder, symlinks resolved, or a hard link of it), "is inside" (under the input folder, or a
    hard link of one of its files), or None."""
    real_out, real_in = os.path.realpath(out), os.path.realpath(value)
    if real_out == real_in:
        return "is"
    if real_out.startswith(real_in.rstrip(os.sep) + os.sep):
        return "is inside"
    try:
        if os.path.isfile(out):
            st = os.stat(out)
            if os.path.isfile(value) and os.path.samefile(out, value):
                return "is"
            if os.path.isdir(value) and (st.st_dev, st.st_ino) in _file_ids(value):
                return "is inside"  # a hard link of one of the input folder's files
    except OSError:
        pass
    return None


def refuse_inputs(path: str, flag: str, inputs: dict | None) -> None:
    """An output ``path`` is none of the ``inputs`` ({flag: file or folder}) and lies under no
    input folder, by resolved path (symlinks followed, hard links compared by inode): an input is
    never an output."""
    for other, value in (inputs or {}).items():
        if not value:
            continue
        how = _overlap(path, value)
        if how:
            real = os.path.realpath(path)
            shown = "" if real == os.path.abspath(path) else f" (resolved: {real!r})"
            kind = "folder " if os.path.isdir(value) else ""
            raise CLIError(
                f"{flag} {path!r}{shown} {how} {other} {kind}{value!r}: an input is never written; "
                f"give {flag} a path outside the inputs"
            )


def _not_stdout(path: str, flag: str, what: str) -> None:
    if path == "-":
        raise CLIError(
            f"{flag} '-': this command writes a {what}, not to standard output; give a path "
            f"(./- for a file named '-')"
        )


def _writable_ancestor(path: str, flag: str) -> None:
    """The nearest existing folder above ``path`` is a folder this process may write in
    (missing folders between are created when the output is written), and no name in ``path``
    is longer than its filesystem allows (NAME_MAX)."""
    too_long = name_too_long(path)
    if too_long:
        raise CLIError(f"{flag} {path!r} cannot be written: {too_long}; give a shorter name")
    p = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise CLIError(f"{flag} {path!r}: {p!r} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path!r}: cannot write in folder {p!r} (permission denied)")


def check_output_file(path: str, flag: str, inputs: dict | None = None, suffix: str | None = None) -> None:
    """``path`` can be written as a file: not a folder, under a writable folder, not one of the
    ``inputs`` ({flag: path}) and, when given, ending in ``suffix``."""
    if not path or not path.strip():
        raise CLIError(f"{flag}: expected a file path, got {path!r}")
    _not_stdout(path, flag, "file")
    refuse_inputs(path, flag, inputs)
    if path.endswith(os.sep) or os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a folder; expected a file path")
    if suffix and not path.lower().endswith(suffix):
        raise CLIError(f"{flag} {path!r}: expected a file name ending in {suffix}")
    _writable_ancestor(path, flag)
    if os.path.lexists(path) and not os.path.isfile(path):
        raise CLIError(f"{flag} {path!r} exists and is not a regular file")


def check_output_dir(
    path: str, flag: str, overwrite: bool | None = None, inputs: dict | None = None, inside: bool = False
) -> None:
    """``path`` can be written as a folder: not a file; when ``overwrite`` is False an existing
    folder must be empty; it is none of the ``inputs``, lies under none and holds none; its parent
    (``inside``: the folder itself when it exists) is writable."""
    if not path or not path.strip():
        raise CLIError(f"{flag}: expected a folder path, got {path!r}")
    _not_stdout(path, flag, "folder")
    refuse_inputs(path, flag, inputs)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a file; expected a folder")
    if os.path.ismount(path):
        raise CLIError(
            f"{flag} {path!r} is a mount point: a folder output is written beside it and swapped in, "
            f"which a mount point cannot be; write to a folder inside it"
        )
    if overwrite is False and os.path.isdir(path) and os.listdir(path):
        raise CLIError(f"{flag} folder {path!r} is not empty; pass --overwrite to replace it")
    real_out = os.path.realpath(path)
    for other, value in (inputs or {}).items():
        if value and (os.path.realpath(value) + os.sep).startswith(real_out + os.sep):
            raise CLIError(f"{flag} {path!r} holds {other} {value!r}: writing it would delete that input")
    if inside and os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise CLIError(f"{flag} {path!r}: cannot write in this folder (permission denied)")
    else:
        _writable_ancestor(path, flag)


def check_input_file(path: str, flag: str) -> None:
    if not path:
        raise CLIError(f"{flag}: expected a file path, got ''")
    if not os.path.exists(path):
        raise CLIError(f"{flag} file {path!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a folder; expected a file")
    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{flag} file {path!r} cannot be read (permission denied)")


# --- sentence files ---------------------------------------------------------------------------------
def read_text(path: str, flag: str) -> str:
    """The file as text: UTF-8 (optional BOM), no NUL bytes."""
    check_input_file(path, flag)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CLIError(f"{flag} file {path!r} cannot be read ({e.strerror or e})") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CLIError(f"{flag} file {path!r} holds a NUL byte at offset {nul}: a binary file, not sentences")
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        data = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw[:at].count(b"\n") + 1
        raise CLIError(
            f"{flag} file {path!r} is not UTF-8 text: byte 0x{raw[at]:02x} at offset "
            f"{at} (line {line}) ({e.reason}); save it as UTF-8"
        ) from None
    return data


_RECORD = 'a JSON string or an object with a string "text" field'


def _record(value, where: str) -> str:
    """The sentence of one JSON item, or a CLIError saying why it is not one."""
    if isinstance(value, dict):
        if "text" not in value:
            raise CLIError(
                f'{where}: JSON object without a "text" field (keys {sorted(value)[:5]}); expected {_RECORD}'
            )
        value = value["text"]
        if not isinstance(value, str):
            raise CLIError(f'{where}: "text" is {type(value).__name__}, not a string')
    elif not isinstance(value, str):
        raise CLIError(f"{where}: JSON {type(value).__name__}; expected {_RECORD}")
    if not value.strip():
        raise CLIError(f"{where}: empty sentence")
    return value


def _is_record(value) -> bool:
    if isinstance(value, dict):
        value = value.get("text")
    return isinstance(value, str)


def read_sentences(path: str, flag: str) -> list[str]:
    """Sentences from a file named by ``flag``: a JSON array, JSON lines or plain text, decided
    by content (see the module docstring)."""
    data = read_text(path, flag)
    ext = os.path.splitext(path)[1].lower()
    json_name = ext in (".json", ".jsonl")
    lines = [(i, line.rstrip("\r")) for i, line in enumerate(data.split("\n"), 1) if line.strip()]
    if not lines:
        raise CLIError(f"{flag} file {path!r} holds no sentences (it is empty or blank)")
    body = data.strip()
    if body[0] in "[{" and len(lines) > 1 or body[0] == "[":
        try:
            whole = json.loads(body)
        except json.JSONDecodeError as e:
            whole = e
        if isinstance(whole, list):
            if all(_is_record(x) for x in whole) or json_name:
                texts = [_record(x, f"{flag} {path}: item {k}") for k, x in enumerate(whole)]
                if not texts:
                    raise CLIError(f"{flag} file {path!r} holds an empty JSON array")
                return texts
        elif isinstance(whole, dict):
            raise CLIError(
                f"{flag} file {path!r} holds one JSON object; expected a JSON array "
                f"of sentences, JSON lines or plain text"
            )
        elif body[0] == "[" and ext == ".json":
            raise CLIError(
                f"{flag} {path}:{whole.lineno}: not valid JSON ({whole.msg}, column {whole.colno})"
            )
    parsed = []
    for i, line in lines:
        try:
            parsed.append((i, line, json.loads(line), None))
        except json.JSONDecodeError as e:
            parsed.append((i, line, None, e))
    if all(err is None and _is_record(v) for _, _, v, err in parsed):
        return [_record(v, f"{flag} {path}:{i}") for i, _, v, _ in parsed]
    objects = [i for i, _, v, err in parsed if err is None and isinstance(v, dict)]
    if json_name or objects:
        why = (
            f"the file is named {ext}"
            if json_name
            else f"line {objects[0]} is a JSON object, so the file is read as JSON lines"
        )
        for i, line, v, err in parsed:
            if err is not None:
                raise CLIError(
                    f"{flag} {path}:{i}: not valid JSON ({err.msg}, column {err.colno}) "
                    f"in {line[:40]!r}; expected {_RECORD} per line ({why})"
                )
            _record(v, f"{flag} {path}:{i}")
    return [line for _, line, _, _ in parsed]


# --- models, pipelines, steerings, checkpoints ----------------------------------------------------
# kind: (the file that marks its folder, what the folder is, how "does not exist" names it)
_FOLDERS = {
    "model": ("config.json", "transformers model", "transformers model"),
    "pipeline": ("model_index.json", "diffusers pipeline", "diffusers"),
}


def _check_folder(path: str, flag: str, kind: str) -> None:
    """A local folder of ``kind``; a folder of the other kind is named with the flag it needs."""
    marker, what, expected = _FOLDERS[kind]
    other = "pipeline" if kind == "model" else "model"
    if not path:
        raise CLIError(f"{flag}: expected a folder path, got ''")
    if not os.path.exists(path):
        raise CLIError(f"{flag} folder {path!r} does not exist (expected a local {expected} folder)")
    if not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a file; expected a local {what} folder")
    if not os.path.isfile(os.path.join(path, marker)):
        if os.path.isfile(os.path.join(path, _FOLDERS[other][0])):
            raise CLIError(f"{flag} {path!r} is a {_FOLDERS[other][1]} folder; use --{other}")
        raise CLIError(f"{flag} {path!r} is not a {what} folder (no {marker})")


def check_model_dir(path: str, flag: str = "--model") -> None:
    """A local transformers model folder (holds config.json)."""
    _check_folder(path, flag, "model")


def check_pipeline_dir(path: str, flag: str = "--pipeline") -> None:
    """A local diffusers pipeline folder (holds model_index.json)."""
    _check_folder(path, flag, "pipeline")


def model_or_pipeline(args) -> str:
    """Which of --model / --pipeline was given (exactly one), its folder checked."""
    if (args.model is None) == (args.pipeline is None):
        given = "neither" if args.model is None else "both"
        raise CLIError(
            f"give exactly one of --model DIR (a causal LM) or --pipeline DIR (diffusers); got {given}"
        )
    if args.pipeline is not None:
        check_pipeline_dir(args.pipeline)
        return "pipeline"
    check_model_dir(args.model)
    return "model"


def model_positions(path: str, flag: str = "--model") -> int | None:
    """The model's max_position_embeddings from its config (no weights read), None if unset."""
    try:
        with quiet_loading():
            cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- a broken config.json is the user's file
        raise CLIError(
            f"{flag} {path!r}: cannot read its config.json ({type(e).__name__}: {one_line(e)})"
        ) from None
    positions = getattr(cfg, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def scheduler_timesteps(path: str) -> int | None:
    """The pipeline scheduler's num_train_timesteps from its config (None if unreadable)."""
    try:
        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            value = json.load(f).get("num_train_timesteps", 1000)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def load_tokenizer(path: str, flag: str = "--model"):
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- a broken folder is the user's input
        raise CLIError(
            f"{flag} {path!r}: cannot load its tokenizer ({type(e).__name__}: {one_line(e)})"
        ) from None


def load_model(
    path: str, dtype: str | None = "auto", tokenizer=None, allow_missing: bool = False, on_meta: bool = False
):
    """(model, tokenizer) from a local transformers causal LM folder, loaded completely: a tensor
    missing from its weight files, unexpected or of another shape is a CLIError naming it unless
    ``allow_missing`` (``--allow-missing-weights``; ``cli.loading``). ``dtype``: a ``--dtype``
    value (None or "auto": the checkpoint's own, ``cli.dtypes``). ``on_meta``: built from its
    config on the meta device in that dtype, no weights read (a rank of ``train --fsdp`` other
    than 0, whose shards come from rank 0)."""
    check_model_dir(path)
    dtype = resolve_dtype(dtype, path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    if on_meta:
        try:
            with quiet_loading(), torch.device("meta"):
                config = AutoConfig.from_pretrained(path)
                model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        except Exception as e:  # noqa: BLE001 -- a broken folder is the user's input
            raise CLIError(
                f"--model {path!r}: cannot build a causal LM from its config "
                f"({type(e).__name__}: {one_line(e)})"
            ) from None
        return model.eval(), tok
    try:
        with quiet_loading():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), output_loading_info=True, ignore_mismatched_sizes=True
            )
    except Exception as e:  # noqa: BLE001 -- a broken folder is the user's input
        raise CLIError(
            f"--model {path!r}: cannot load a causal LM from it ({type(e).__name__}: {one_line(e)})"
        ) from None
    refuse_incomplete(info, "--model", path, allow_missing)
    model.eval()
    return model, tok


def load_pipeline(path: str, allow_missing: bool = False, dtype: str | None = "auto"):
    """A local diffusers text-to-image pipeline, its model components loaded completely (as
    ``load_model``) in ``dtype`` (a ``--dtype`` value; auto: the UNet's stored type)."""
    check_pipeline_dir(path)
    torch_dtype = getattr(torch, resolve_dtype(dtype, path, "pipeline"))
    try:
        DiffusionPipeline = require("diffusers", "--pipeline").DiffusionPipeline  # optional, heavy
    except MissingExtraError as e:
        raise CLIError(f"--pipeline {path!r}: {e}") from None
    try:
        components = load_components(path, "--pipeline", allow_missing, torch_dtype)
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(path, **components, torch_dtype=torch_dtype)
    except CLIError:
        raise
    except Exception as e:  # noqa: BLE001 -- a broken folder is the user's input
        raise CLIError(
            f"--pipeline {path!r}: cannot load a diffusers pipeline from it "
            f"({type(e).__name__}: {one_line(e)})"
        ) from None
    if not hasattr(pipe, "unet") or not hasattr(pipe, "components"):
        raise CLIError(
            f"--pipeline {path!r}: {type(pipe).__name__} has no UNet; expected a "
            f"text-to-image pipeline (Stable Diffusion, SDXL)"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_model_or_pipeline(args, on_meta: bool = False):
    """(model, tokenizer) from --model, or (pipeline, None) from --pipeline: exactly one, in the
    type ``--dtype`` asks for (``args.dtype``; auto: the checkpoint's own). ``on_meta``: the
    model built on the meta device (``load_model``)."""
    allow = getattr(args, "allow_missing_weights", False)
    dtype = getattr(args, "dtype", None)
    if model_or_pipeline(args) == "pipeline":
        return load_pipeline(args.pipeline, allow, dtype), None
    return load_model(args.model, dtype, allow_missing=allow, on_meta=on_meta)


def load_steering(path: str, flag: str = "--steering"):
    """A steering file (read before any model, so a bad one fails fast). Any failure to parse
    the file, or metadata of the wrong shape, is the file's problem: a CLIError naming it."""
    check_input_file(path, flag)
    try:
        steering = Steering.load(path)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OSError, SafetensorError) as e:
        msg = one_line(e)
        if path in msg:
            raise CLIError(f"{flag}: {msg}") from None
        raise CLIError(
            f"{flag} {path!r} is not a valid lineas_fast steering file ({type(e).__name__}: {msg})"
        ) from None
    model = steering.metadata.get("model")
    if model is not None and not isinstance(model, dict):
        raise CLIError(
            f'{flag} {path!r} has malformed metadata: "model" is '
            f"{type(model).__name__}, expected an object (the model fingerprint)"
        )
    return steering


CHECKPOINT_KEYS = ("step", "maps", "optimizer", "scheduler", "generator", "history")


def _looks_like(path: str) -> str:
    return {
        "empty": "the file is empty; ",
        "safetensors": "it is a safetensors file, e.g. a steering written by --out; ",
    }.get(file_kind(path), "")


def check_checkpoint(path: str, flag: str = "--resume", config: dict | None = None) -> None:
    """``path`` is a training checkpoint written by ``lineas-fast train --checkpoint`` (and, when
    ``config`` is given, written with the same settings); the library checks the rest (model,
    data) before training."""
    check_input_file(path, flag)
    expected = "expected the file written by `lineas-fast train --checkpoint`"
    from lineas_fast.training.checkpoints import CheckpointError, read_checkpoint

    try:  # bounded read, kept for the library's own check: the file is loaded once
        state = read_checkpoint(path, keep=True)
    except CheckpointError as e:
        msg = one_line(e).replace("lineas_fast training checkpoint", "lineas-fast training checkpoint")
        raise CLIError(f"{flag}: {msg}; {expected}") from None
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the user's input
        raise CLIError(
            f"{flag} {path!r} is not a lineas-fast training checkpoint "
            f"({_looks_like(path)}torch.load failed: {type(e).__name__}; "
            f"{expected})"
        ) from None
    if (
        not isinstance(state, dict)
        or any(k not in state for k in CHECKPOINT_KEYS)
        or state.get("format") != CHECKPOINT_FORMAT
    ):
        raise CLIError(
            f"{flag} {path!r} is not a lineas-fast training checkpoint ({_looks_like(path)}{expected})"
        )
    saved = state.get("config")
    if config is not None and isinstance(saved, dict):
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in config.items() if saved.get(k) != v]
        if diff:
            more = f"; {len(diff) - 4} more" if len(diff) > 4 else ""
            raise CLIError(
                f"{flag} {path!r} was written with other settings "
                f"({'; '.join(diff[:4])}{more}); "
                f"resume with the arguments of that run"
            )


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


def add_allow_missing(parser) -> None:
    """The ``--allow-missing-weights`` flag of a command that loads a model folder."""
    parser.add_argument(
        ALLOW_FLAG,
        action="store_true",
        help="load a model folder whose weights miss, add or reshape tensors of its config "
        "(they are randomly initialised); default: refuse it, naming the tensors",
    )


def check_match_time(pattern: str | None, flag: str, model) -> None:
    """``pattern`` matches the model's module names within ``patterns.MATCH_SECONDS`` (a CLIError
    naming the flag otherwise), before the library matches it in this process."""
    if not pattern:
        return
    root = getattr(model, "unet", model)  # a pipeline's steering reads its UNet
    why = match_time_problem(pattern, [n for n, _ in root.named_modules() if n])
    if why:
        raise CLIError(f"{flag} {pattern!r}: {why}; simplify the pattern")


def fits(steering, model, args, flag: str = "--model") -> None:
    """The steering file's maps fit the loaded model (a CLIError names both; a fingerprint
    mismatch says which flag skips that check)."""
    try:
        steering.validate(model, strict=not getattr(args, "no_strict", False))
    except (ValueError, TypeError) as e:
        fingerprint = getattr(e, "argument", None) == "strict"
        hint = " (give --no-strict to skip the fingerprint check)" if fingerprint else ""
        raise CLIError(
            f"--steering {args.steering!r} does not fit {flag} "
            f"{getattr(args, flag[2:])!r}: {one_line(e)}{hint}"
        ) from None


def need_matplotlib(command: str) -> None:
    """``command`` draws its plots with matplotlib: refuse before any work when it is missing."""
    if missing("matplotlib"):
        raise CLIError(
            f"{command} draws its plots with matplotlib, which is not installed: "
            f"{install_hint('matplotlib')}; nothing was run"
        )
