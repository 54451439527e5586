"""Reading files as untrusted input: every size, depth, dtype, shape and offset a file declares is
checked against the file's real size (and against fixed bounds) before anything of the declared
size is allocated, so a refusal costs memory bounded by the file, never by its claims.

* ``json_loads`` parses JSON whose nesting depth and length are bounded (a linear scan first:
  ``json.loads`` itself recurses and raises RecursionError on deep input).
* ``safetensors_header`` reads a safetensors file's header itself (8-byte little-endian length,
  then JSON) and checks every tensor's dtype, shape and ``data_offsets`` against each other and
  against the file's size: offsets inside the data section, no two tensors overlapping, the
  byte count equal to the shape's element count times the dtype's size.

Errors are ``ValueError`` naming the file (and the tensor or key)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

MAX_JSON_DEPTH = 64  # nesting of arrays/objects; metadata written by lineas_fast uses < 8
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_TENSOR_DIMS = 8

# safetensors dtype name -> bytes per element (the formats' sub-byte types are refused)
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


def json_depth(text: str) -> int:
    """The deepest nesting of arrays/objects in JSON ``text`` (strings skipped), by a linear
    scan that never recurses."""
    depth = deepest = 0
    for m in _JSON_TOKENS.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif tok in "]}":
            depth -= 1
    return deepest


def json_loads(text, what: str, max_depth: int = MAX_JSON_DEPTH, max_chars: int = MAX_HEADER_BYTES):
    """``json.loads(text)`` for untrusted text: a ValueError naming ``what`` when it is not a
    string, longer than ``max_chars``, nested deeper than ``max_depth`` or not JSON."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a JSON string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ValueError(f"{what}: {len(text)} characters of JSON, more than the {max_chars} allowed")
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{what}: JSON nested {depth} deep, more than the {max_depth} allowed")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{what}: not valid JSON ({one_line(e)})") from None


def object_depth(value, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of dicts/lists/tuples in ``value``, iteratively; stops counting past
    ``limit`` + 1 (a cycle reads as too deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((c, depth + 1) for c in children)
    return deepest


def one_line(e) -> str:
    return " ".join(str(e).split())[:200]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header declares it (checked against the file)."""

    name: str
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple
    begin: int  # byte offsets inside the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    metadata: dict  # str -> str
    tensors: dict  # name -> TensorEntry
    data_start: int  # file offset of the data section


def safetensors_header(
    path: str, max_header: int = MAX_HEADER_BYTES, what: str | None = None
) -> SafetensorsHeader:
    """Read and check the header of safetensors file ``path`` without reading any tensor.

    Checks: the 8-byte length fits the file and ``max_header``; the header is a JSON object
    (depth-bounded) of {name: {"dtype", "shape", "data_offsets"}} plus an optional
    ``__metadata__`` object of strings; every dtype is known; every shape is a list of at most
    ``MAX_TENSOR_DIMS`` non-negative integers; every [begin, end] lies inside the data section
    with end − begin = numel × itemsize; no two tensors overlap. ValueError naming the file
    (and the tensor) otherwise, starting with ``what`` (default: "safetensors file <path>")."""
    where = what or f"safetensors file {path!r}"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{where}: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(max_header, size - 8):
            raise ValueError(
                f"{where}: header length {n} bytes, more than the file's remaining {size - 8} "
                f"bytes or the {max_header} allowed"
            )
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: header is not UTF-8 text") from None
    header = json_loads(text, f"{where} header")
    if not isinstance(header, dict):
        raise ValueError(f"{where}: header is {type(header).__name__}, expected a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{where}: __metadata__ must be an object of strings")
    data_len = size - 8 - n
    tensors = {}
    for name, info in header.items():
        tensors[name] = _entry(name, info, data_len, where)
    spans = sorted((e.begin, e.end, e.name) for e in tensors.values() if e.end > e.begin)
    for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise ValueError(f"{where}: tensors {a!r} and {b!r} overlap in the file's data section")
    return SafetensorsHeader(path, meta, tensors, 8 + n)


def _entry(name: str, info, data_len: int, where: str) -> TensorEntry:
    if not isinstance(info, dict):
        raise ValueError(f"{where}: tensor {name!r} entry is {type(info).__name__}, expected an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{where}: tensor {name!r} has unknown or unsupported dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_DIMS
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ValueError(f"{where}: tensor {name!r} has a malformed shape {str(shape)[:80]}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise ValueError(f"{where}: tensor {name!r} has malformed data_offsets {str(offsets)[:80]}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise ValueError(
            f"{where}: tensor {name!r} declares bytes [{begin}, {end}) but the data section holds "
            f"{data_len} bytes"
        )
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if nbytes != end - begin:
        raise ValueError(
            f"{where}: tensor {name!r} declares shape {tuple(shape)} of {dtype} ({nbytes} bytes) "
            f"but {end - begin} bytes of data"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)
