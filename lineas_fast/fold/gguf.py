"""Folding a steering into a GGUF model file (llama.cpp, Ollama), quantized weights untouched.

With a = 1 − λ + λω and c = λb (SPEC §6), the steered norm output is a⊙(w⊙x̂) + c:

  * the norm's weight tensor (``blk.N.attn_norm.weight``, stored in f32 by llama.cpp's
    converter even in quantized files) becomes a⊙w, written in f32;
  * the shift c goes into f32 bias tensors of the projections that read the norm's output
    (W(y + c) + β = Wy + (β + W·c)), with W the *dequantized* matrix of the file
    (``gguf.quants.dequantize``), so the bias matches what llama.cpp multiplies;
  * every other tensor, every quantized matrix included, is copied byte for byte.

Which bias tensors llama.cpp's loader accepts was read off its source (``src/models/<arch>.cpp``
of the llama.cpp vendored by ``llama-cpp-python==0.3.36``): ``create_tensor_qkv`` gives every
arch optional ``attn_q/attn_k/attn_v.bias`` (or ``attn_qkv.bias``); only the ``llama`` arch
loads optional ``ffn_gate.bias``/``ffn_up.bias``. A tensor the loader does not read makes it
fail ("wrong number of tensors"), so anything else is refused before writing: a shift on the
MLP-input norm of qwen2/qwen3, on the final norm (the output projection has no bias), on
qwen3's per-head q/k norms (their output is rotated), on a mixture-of-experts FFN; a norm stored
quantized; per-token (DSAS-gated) maps; an architecture not in ``GGUF_FAMILIES``.

Module names are those of the transformers model the steering was trained on (the GGUF file
loaded with ``from_pretrained(dir, gguf_file=...)``): ``model.layers.3.post_attention_layernorm``
→ ``blk.3.ffn_norm``, ``model.layers.3.input_layernorm`` → ``blk.3.attn_norm``, ``model.norm``
→ ``output_norm``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
import torch

from lineas_fast._version import __version__
from lineas_fast.atomic import atomic_path
from lineas_fast.checks import ArgumentError, number
from lineas_fast.extras import require
from lineas_fast.fold.fusion import FusionError, effective_map, refuse_gates
from lineas_fast.numerics import check_effective, check_written
from lineas_fast.records import AlreadySteeredError
from lineas_fast.steering import Steering

_QKV = ("attn_q", "attn_k", "attn_v")


@dataclass(frozen=True)
class GGUFFamily:
    """What llama.cpp's loader of one GGUF architecture reads.

    model_types  transformers ``config.model_type`` values whose GGUF files use this arch
    readers      norm → the projections that read only its output and whose optional bias
                 tensors the loader reads
    no_bias      norm → why its shift has nowhere to go in this arch
    rotary       per-head norms whose output is rotated (scale folds, shift does not)
    """

    model_types: tuple
    readers: dict
    no_bias: dict = field(default_factory=dict)
    rotary: tuple = ()


_FINAL = (
    "the final norm is read by the output projection, which has no bias tensor in "
    "llama.cpp's {arch} loader (a scale-only map folds)"
)
_NO_FFN_BIAS = (
    "llama.cpp's {arch} loader reads no ffn_gate/ffn_up bias tensors, so the "
    "shift c = λb has no bias to go into (a scale-only map folds; the llama arch "
    "takes MLP biases)"
)

GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily(
        ("llama", "mistral"),
        readers={"attn_norm": _QKV, "ffn_norm": ("ffn_gate", "ffn_up")},
        no_bias={"output_norm": _FINAL},
    ),
    "qwen2": GGUFFamily(
        ("qwen2",), readers={"attn_norm": _QKV}, no_bias={"ffn_norm": _NO_FFN_BIAS, "output_norm": _FINAL}
    ),
    "qwen3": GGUFFamily(
        ("qwen3",),
        readers={"attn_norm": _QKV},
        no_bias={"ffn_norm": _NO_FFN_BIAS, "output_norm": _FINAL},
        rotary=("attn_q_norm", "attn_k_norm"),
    ),
}

# transformers module name (inside a decoder layer) → GGUF tensor name stem
_LAYER_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
_LAYER_RE = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")
_FINAL_NAMES = ("model.norm", "norm")


def gguf_norm_name(module: str) -> str | None:
    """The GGUF tensor stem of a transformers norm name (``model.layers.3.input_layernorm`` →
    ``blk.3.attn_norm``), or None when the module is not a norm this module knows."""
    if module in _FINAL_NAMES:
        return "output_norm"
    m = _LAYER_RE.fullmatch(module)
    if m and m.group(2) in _LAYER_NORMS:
        return f"blk.{m.group(1)}.{_LAYER_NORMS[m.group(2)]}"
    return None


@dataclass
class _Edit:
    module: str
    norm: str  # GGUF stem, e.g. blk.3.ffn_norm
    a: np.ndarray  # (d,) float64
    c: np.ndarray  # (d,) float64
    readers: list = field(default_factory=list)  # GGUF stems that take W·c in their bias


def _reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the caller's input
        raise ValueError(
            f"{path!r} is not a readable GGUF file ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    if reader.endianess != gguf.GGUFEndian.LITTLE or sys.byteorder != "little":
        raise ValueError(f"{path!r}: only little-endian GGUF files on a little-endian machine are supported")
    check_tensor_layout(reader, path)
    return reader


def check_tensor_layout(reader, path: str) -> None:
    """Every tensor's declared data, checked before anything is folded or copied: its offset a
    multiple of the file's alignment, its element count the product of its dimensions (no
    wrap-around), its bytes inside the file, and no two tensors' bytes overlapping (a corrupt
    offset pointing into another tensor would be read as that tensor's bytes). ValueError
    naming the file and the tensor."""
    size = os.path.getsize(path)
    align = int(reader.alignment)
    spans = []
    for t in reader.tensors:
        dims = [int(d) for d in t.field.parts[3]]
        rel = int(t.field.parts[-1][0])
        where = f"GGUF file {path!r}: tensor {t.name!r}"
        if any(d < 1 for d in dims) or math.prod(dims) != int(t.n_elements):
            raise ValueError(f"{where} declares dimensions {dims} (element count overflows or is zero)")
        if rel % align:
            raise ValueError(f"{where} starts at data offset {rel}, not a multiple of the alignment {align}")
        start, n = int(t.data_offset), int(t.n_bytes)
        if start + n > size or int(t.data.nbytes) != n:
            raise ValueError(f"{where} declares bytes [{start}, {start + n}) but the file holds {size} bytes")
        spans.append((start, start + n, t.name))
    spans.sort()
    for (_, end0, a), (start1, _, b) in zip(spans, spans[1:]):
        if start1 < end0:
            raise ValueError(
                f"GGUF file {path!r}: tensors {a!r} and {b!r} overlap (a corrupt offset: "
                f"{b!r} starts at byte {start1}, inside {a!r} which ends at {end0})"
            )


def _arch(reader, path: str) -> str:
    f = reader.fields.get("general.architecture")
    if f is None:
        raise ValueError(f"{path!r} has no general.architecture key: not a GGUF model file")
    return str(f.contents())


def _check_model_type(steering: Steering, arch: str, fam: GGUFFamily, path: str) -> None:
    want = steering.metadata.get("model")
    mtype = want.get("model_type") if isinstance(want, dict) else None
    if mtype and mtype not in fam.model_types:
        raise ArgumentError(
            f"steering was trained on a {mtype!r} model but {path!r} is a GGUF "
            f"{arch!r} model (expects {'/'.join(fam.model_types)}); pass "
            f"strict=False to fold it anyway",
            "strict",
        )


def plan_gguf(reader, steering: Steering, arch: str, path: str) -> list[_Edit]:
    """Check every map of an effective (a, c) steering can fold into this file; the edits, or
    FusionError listing every module that cannot."""
    import gguf

    fam = GGUF_FAMILIES[arch]
    tensors = {t.name: t for t in reader.tensors}
    floats = {
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16,
        gguf.GGMLQuantizationType.F64,
    }
    edits, problems = [], {}
    for module in steering.modules:
        a_t, c_t = steering[module]
        a, c = a_t.detach().double().cpu().numpy(), c_t.detach().double().cpu().numpy()
        stem = gguf_norm_name(module)
        if stem is None:
            problems[module] = (
                f"not a norm that maps to a GGUF tensor (known: "
                f"{', '.join(_LAYER_NORMS)} in model.layers.N, and model.norm)"
            )
            continue
        norm = tensors.get(stem + ".weight")
        if norm is None:
            problems[module] = f"{path!r} has no tensor {stem + '.weight'!r}"
            continue
        if norm.tensor_type not in floats:
            problems[module] = (
                f"{stem}.weight is stored quantized ({norm.tensor_type.name}): "
                f"its scaled weight cannot be written back byte-exactly"
            )
            continue
        if int(norm.n_elements) != a.shape[0]:
            problems[module] = (
                f"{stem}.weight has {int(norm.n_elements)} coordinates but the "
                f"map has {a.shape[0]}: this steering was trained on another "
                f"model"
            )
            continue
        edit = _Edit(module, stem, a, c)
        if bool((c != 0).any()):
            why = _readers(edit, stem, fam, arch, tensors)
            if why:
                problems[module] = why
                continue
        edits.append(edit)
    if problems:
        raise FusionError(problems)
    return edits


def _readers(edit: _Edit, stem: str, fam: GGUFFamily, arch: str, tensors: dict) -> str | None:
    """Fill ``edit.readers`` with the projections whose biases take W·c; why not, else None."""
    block, _, local = stem.rpartition(".")
    if local in fam.rotary:
        return (
            f"per-head norm whose output goes through the rotary embedding ({arch}): a "
            f"shift has no bias to go into (a scale-only map folds)"
        )
    if local in fam.no_bias:
        return fam.no_bias[local].format(arch=arch)
    names = fam.readers.get(local)
    if names is None:
        return f"llama.cpp's {arch} loader has no bias tensors for the readers of {local}"
    if local == "ffn_norm" and f"{block}.ffn_gate_inp.weight" in tensors:
        return (
            f"mixture-of-experts FFN ({block}.ffn_gate_inp): the router and the experts "
            f"have no bias tensors in llama.cpp"
        )
    if local == "attn_norm" and f"{block}.attn_qkv.weight" in tensors:
        names = ("attn_qkv",)  # fused q/k/v: one bias over the fused rows
    missing = [f"{block}.{r}.weight" for r in names if f"{block}.{r}.weight" not in tensors]
    if missing:
        return f"expected reader tensors {missing} in the file"
    edit.readers = [f"{block}.{r}" for r in names]
    return None


def _dequantized(tensor) -> np.ndarray:
    """The tensor's values as float64, shape (rows, cols) for a matrix (rows = outputs)."""
    import gguf

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{tensor.name}: gguf {getattr(gguf, '__version__', '')} cannot "
            f"dequantize {tensor.tensor_type.name}, needed to compute its bias "
            f"W·c"
        ) from None
    return np.asarray(values, dtype=np.float64)


def _fold_history(reader) -> list[str]:
    """The fold records a GGUF file carries (JSON strings, oldest first): its
    ``lineas_fast.history``, or one record rebuilt from the ``lineas_fast.*`` keys of a file
    written before the history existed; [] for an unsteered file."""
    fields = reader.fields
    if "lineas_fast.history" in fields:
        return [str(x) for x in fields["lineas_fast.history"].contents()]
    if any(name.startswith("lineas_fast.") for name in fields):
        old = {k[len("lineas_fast.") :]: fields[k].contents() for k in fields if k.startswith("lineas_fast.")}
        return [json.dumps(old, default=str)]
    return []


def _new_tensors(reader, edits: list[_Edit]) -> dict[str, np.ndarray]:
    """{GGUF tensor name: new f32 values} for every norm weight and reader bias that changes."""
    tensors = {t.name: t for t in reader.tensors}
    new: dict[str, np.ndarray] = {}
    for e in edits:
        w = _dequantized(tensors[e.norm + ".weight"]).reshape(-1)
        new[e.norm + ".weight"] = (e.a * w).astype(np.float32)
        for r in e.readers:
            weight = _dequantized(tensors[r + ".weight"])
            weight = weight.reshape(-1, e.c.shape[0])  # (outputs, inputs)
            bias = weight @ e.c
            name = r + ".bias"
            if name in new:
                base = new[name].astype(np.float64)
            elif name in tensors:
                base = _dequantized(tensors[name]).reshape(-1)
            else:
                base = np.zeros_like(bias)
            new[name] = (base + bias).astype(np.float32)
    return new


def fuse_gguf(
    in_gguf: str,
    steering: Union[Steering, Sequence[Steering]],
    strength: float = 1.0,
    out_gguf: str | None = None,
    inverse: bool = False,
    strict: bool = True,
    compose: bool = False,
) -> dict:
    """Fold ``steering`` at ``strength`` into the GGUF model ``in_gguf`` and write ``out_gguf``
    (atomically: a temporary beside it, renamed in one step).

    Norm weights (f32/f16/bf16 in the file) become a⊙w in f32; shifts become f32 bias tensors
    ``<reader>.bias`` = old bias + W·c of the projections reading the norm, W dequantized from
    the file; every other tensor, quantized ones included, is copied byte for byte, and every
    metadata key is kept (``lineas_fast.*`` keys record the fold). A list of steerings is
    composed (first applied first) and folded once; a negative strength (or ``inverse``) folds
    the inverse map. ``strict`` checks the steering's recorded model type against the file's
    architecture. A file that already records a fold (``lineas_fast.*`` keys) is refused
    (``AlreadySteeredError``) unless ``compose=True``; then the new fold acts on top and
    ``lineas_fast.history`` keeps every fold's record (JSON strings, oldest first). The
    effective coefficients and every new tensor are range-checked (finite, within float32)
    before anything is written (``lineas_fast.numerics``).

    Raises FusionError (a ValueError) naming every module llama.cpp cannot express, before
    anything is written; ValueError for a file that is not a supported GGUF model. Returns
    {"out", "arch", "scaled": [norm tensors], "biases": {bias tensor: "created" | "added"},
    "copied": number of tensors copied unchanged}.
    """
    require("gguf", "lf.fuse_gguf")  # the reader and writer of the file format
    strength = number(strength, "strength")
    if out_gguf is None or not str(out_gguf).strip():
        raise ValueError(f"out_gguf: expected a file path, got {out_gguf!r}")
    steerings = [steering] if isinstance(steering, Steering) else list(steering)
    if not steerings or not all(isinstance(st, Steering) for st in steerings):
        raise TypeError("fuse_gguf needs a Steering or a non-empty list of them")
    refuse_gates(steerings)
    reader = _reader(os.fspath(in_gguf))
    arch = _arch(reader, in_gguf)
    fam = GGUF_FAMILIES.get(arch)
    if fam is None:
        raise FusionError(
            {
                "<model>": f"GGUF architecture {arch!r} is not in "
                f"lineas_fast.fold.gguf.GGUF_FAMILIES "
                f"({', '.join(GGUF_FAMILIES)}): which bias tensors its "
                f"llama.cpp loader reads is unknown"
            }
        )
    history = _fold_history(reader)
    if history and not compose:
        raise AlreadySteeredError(
            f"{os.fspath(in_gguf)!r} already carries a lineas_fast fold ({history[-1]}); folding "
            f"another steering would steer twice. Start from the unsteered GGUF, or pass "
            f"compose=True (CLI: --compose) to fold this one on top"
        )
    if strict:
        for st in steerings:
            _check_model_type(st, arch, fam, in_gguf)
    edits = []
    if strength != 0:
        effective = effective_map(steerings[0], strength, inverse)
        for st in steerings[1:]:
            effective = effective_map(st, strength, inverse).compose(effective)
        for n in effective.modules:
            check_effective(n, *effective[n], torch.float32, strength)
        edits = plan_gguf(reader, effective, arch, in_gguf)
    new = _new_tensors(reader, edits)
    for name, values in new.items():
        check_written(name, torch.from_numpy(np.asarray(values, dtype=np.float64)), torch.float32)
    report = {
        "out": os.fspath(out_gguf),
        "arch": arch,
        "scaled": [e.norm + ".weight" for e in edits],
        "biases": {},
        "copied": 0,
    }
    existing = {t.name for t in reader.tensors}
    for name in new:
        if name.endswith(".bias"):
            report["biases"][name] = "added" if name in existing else "created"
    _write(reader, arch, new, out_gguf, steerings, strength, inverse, report)
    return report


def _layout(reader, new: dict[str, np.ndarray]) -> list[tuple[str, object]]:
    """Output tensors in the input's order, each new bias right after its weight: (name, the
    reader's tensor to copy) or (name, new f32 values)."""
    order = []
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        order.append((t.name, new.get(t.name, t)))
        stem = t.name[: -len(".weight")] if t.name.endswith(".weight") else None
        if stem and stem + ".bias" in new and stem + ".bias" not in names:
            order.append((stem + ".bias", new[stem + ".bias"]))
    return order


def _write(
    reader, arch: str, new: dict, out: str, steerings, strength: float, inverse: bool, report: dict
) -> None:
    import gguf

    layout = _layout(reader, new)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        align = reader.fields.get(gguf.Keys.General.ALIGNMENT)
        if align is not None:
            writer.data_alignment = int(align.contents())
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith(("GGUF.", "lineas_fast.")):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        modules = sorted({m for st in steerings for m in st.modules})
        writer.add_string("lineas_fast.version", __version__)
        writer.add_float64("lineas_fast.strength", float(-strength if inverse else strength))
        writer.add_array("lineas_fast.modules", modules)
        record = {
            "version": __version__,
            "strength": float(-strength if inverse else strength),
            "modules": modules,
        }
        writer.add_array("lineas_fast.history", _fold_history(reader) + [json.dumps(record)])
        for name, item in layout:
            if isinstance(item, np.ndarray):
                writer.add_tensor_info(
                    name, item.shape, item.dtype, item.nbytes, gguf.GGMLQuantizationType.F32
                )
            else:
                writer.add_tensor_info(
                    name, item.data.shape, item.data.dtype, item.data.nbytes, item.tensor_type
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, item in layout:
            if isinstance(item, np.ndarray):
                writer.write_tensor_data(item)
            else:
                writer.write_tensor_data(item.data, tensor_endianess=reader.endianess)
                report["copied"] += 1
        writer.close()
