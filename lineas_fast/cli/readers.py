"""What the command line reads from files before any model: sentence files, steering files and
training checkpoints. Every problem is a ``CLIError`` naming the flag and the file.

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

import codecs
import json
import os

from safetensors import SafetensorError

from lineas_fast.atomic import file_kind
from lineas_fast.cli.errors import CLIError, one_line
from lineas_fast.cli.paths import check_input_file
from lineas_fast.steering import Steering
from lineas_fast.training.checkpoints import CHECKPOINT_FORMAT


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
