"""A training checkpoint read as untrusted input: the archive's directory checked before
``torch.load`` (no compressed entry, sizes within the file, so what is read is bounded by the
file's real size), then every field's type, shape and range checked before anything is restored.

Every refusal is a ``ValueError`` (``CheckpointError``) naming the checkpoint file and the field,
e.g. ``checkpoint 'ck.pt' is damaged: optimizer.state[3].exp_avg: shape (64,), expected (32,)``.
"""

from __future__ import annotations

import math
import numbers
import os
import zipfile

import torch

MAX_ENTRIES = 100_000  # files inside the archive (one per tensor storage, plus a few)
MAX_MAP_DIM = 1 << 24  # coordinates of one map, as for a steering file
HISTORY_KEYS = ("step", "loss", "per_layer", "support", "lr", "control_loss")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed: damaged, edited, or not a checkpoint. A
    ``ValueError``, so the CLI exits with status 2."""


def _fail(path: str, field: str, why: str):
    raise CheckpointError(f"checkpoint {path!r} is damaged: {field}: {why}")


def check_archive(path: str) -> None:
    """The file is a zip archive as ``torch.save`` writes one, whose entries are all stored
    uncompressed and together fit in the file: ``torch.load`` then reads at most the file's
    size (a deflated entry could inflate far beyond it). Checked from the zip's central
    directory, before any entry is read."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as zf:
            entries = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{path!r} is not a lineas_fast training checkpoint (not the zip archive torch.save "
            f"writes: {' '.join(str(e).split())[:120]})"
        ) from None
    if len(entries) > MAX_ENTRIES:
        _fail(path, "archive", f"{len(entries)} entries, more than the {MAX_ENTRIES} allowed")
    total = 0
    for e in entries:
        if e.compress_type != zipfile.ZIP_STORED or e.compress_size != e.file_size:
            _fail(
                path,
                f"archive entry {e.filename!r}",
                f"compressed ({e.compress_size} bytes inflating to {e.file_size}); torch.save "
                f"stores entries uncompressed, so this file was made or edited elsewhere",
            )
        total += e.file_size
    if total > size:
        _fail(path, "archive", f"entries declare {total} bytes but the file holds {size}")


# --- field checks ------------------------------------------------------------------------------
def _int(path, field, value, low=None, high=None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(path, field, f"expected an integer, got {type(value).__name__} {str(value)[:60]!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        _fail(path, field, f"{value} is outside [{low}, {high}]")
    return int(value)


def _float(path, field, value, low=None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(path, field, f"expected a finite number, got {type(value).__name__} {str(value)[:60]!r}")
    if low is not None and value < low:
        _fail(path, field, f"{value} is below {low}")
    return float(value)


def _dict(path, field, value) -> dict:
    if not isinstance(value, dict):
        _fail(path, field, f"expected an object (dict), got {type(value).__name__} {str(value)[:60]!r}")
    return value


def _list(path, field, value) -> list:
    if not isinstance(value, (list, tuple)):
        _fail(path, field, f"expected a list, got {type(value).__name__} {str(value)[:60]!r}")
    return list(value)


def _tensor(path, field, value, shape=None, dtype=None, floating=True, nonnegative=False) -> torch.Tensor:
    """A tensor of ``shape`` (and ``dtype``) whose storage holds every element (no stride-0
    inflation), checked in that order, then finite (float) and ≥ 0 when asked."""
    if not isinstance(value, torch.Tensor):
        _fail(path, field, f"expected a tensor, got {type(value).__name__} {str(value)[:60]!r}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        _fail(path, field, f"shape {tuple(value.shape)}, expected {tuple(shape)}")
    if value.numel() > MAX_MAP_DIM or value.ndim > 8:
        _fail(path, field, f"shape {tuple(value.shape)} is too large")
    if dtype is not None and value.dtype != dtype:
        _fail(path, field, f"dtype {value.dtype}, expected {dtype}")
    if floating and not value.is_floating_point():
        _fail(path, field, f"dtype {value.dtype}, expected a floating-point tensor")
    need = (value.storage_offset() + value.numel()) * value.element_size()
    if value.numel() and (
        not value.is_contiguous() or value.untyped_storage().nbytes() < need or value.is_sparse
    ):
        _fail(path, field, "not a plain contiguous tensor")
    if floating and not bool(torch.isfinite(value).all()):
        _fail(path, field, "not finite (NaN or Inf)")
    if nonnegative and bool((value < 0).any()):
        _fail(path, field, "has negative values")
    return value


def check_state(
    state: dict, path: str, steps: int, names: list, dims: dict, gated: bool, n_loss: int | None
) -> None:
    """Every field of a checkpoint that names a lineas_fast checkpoint, checked on its own and
    against the run (``steps`` to run, the modules ``names`` with their coordinates ``dims``
    (None where unknown), whether it has gates, the number of loss modules): types, shapes,
    ranges and finiteness. CheckpointError naming the file and the field otherwise."""
    _int(path, "format_version", state.get("format_version", 0), low=0)
    step = _int(path, "step", state["step"], low=0, high=steps)
    for key in ("config", "model", "data", "reading"):
        if key in state and state[key] is not None:
            _dict(path, key, state[key])
    for role, digest in (state.get("data") or {}).items():
        if digest is not None:
            _dict(path, f"data.{role}", digest)
            _int(path, f"data.{role}.count", digest.get("count"), low=0)
            if not isinstance(digest.get("sha256"), str):
                _fail(path, f"data.{role}.sha256", "expected a string")
    maps = _dict(path, "maps", state["maps"])
    shapes = []
    for m, pair in maps.items():
        if not isinstance(m, str):
            _fail(path, "maps", f"module name {m!r} is not a string")
        pair = _list(path, f"maps[{m!r}]", pair)
        if len(pair) != 2:
            _fail(path, f"maps[{m!r}]", f"expected a pair (omega, bias), got {len(pair)} items")
        d = dims.get(m)
        if d is None:
            om = pair[0]
            d = om.shape[0] if isinstance(om, torch.Tensor) and om.ndim == 1 else None
            if d is None:
                _fail(path, f"maps[{m!r}].omega", "expected a tensor of shape (d,)")
        for i, what in enumerate(("omega", "bias")):
            _tensor(path, f"maps[{m!r}].{what}", pair[i], shape=(d,), dtype=torch.float32)
        shapes += [(d,), (d,)]
    gates = _dict(path, "gates", state["gates"])
    if gates and not gated:
        _fail(path, "gates", f"{len(gates)} gate(s) saved but this run trains no gates")
    for m, pair in gates.items():
        if m not in maps:
            _fail(path, f"gates[{m!r}]", "gate for a module with no map")
        pair = _list(path, f"gates[{m!r}]", pair)
        if len(pair) != 2:
            _fail(path, f"gates[{m!r}]", f"expected a pair (w, c), got {len(pair)} items")
        d = maps[m][0].shape[0]
        _tensor(path, f"gates[{m!r}].w", pair[0], shape=(d,), dtype=torch.float32)
        _tensor(path, f"gates[{m!r}].c", pair[1], shape=(1,), dtype=torch.float32)
        shapes += [(d,), (1,)]
    _check_optimizer(state["optimizer"], path, shapes, step)
    _check_scheduler(state["scheduler"], path, step)
    gen = state["generator"]
    rng_shape = torch.Generator().get_state().shape
    _tensor(path, "generator", gen, shape=rng_shape, dtype=torch.uint8, floating=False)
    history = _list(path, "history", state["history"])
    if len(history) != step:
        _fail(path, "history", f"{len(history)} records for {step} steps")
    for i, rec in enumerate(history):
        f = f"history[{i}]"
        rec = _dict(path, f, rec)
        if sorted(rec) != sorted(HISTORY_KEYS):
            _fail(path, f, f"keys {sorted(rec)[:8]}, expected {list(HISTORY_KEYS)}")
        _int(path, f + ".step", rec["step"], low=i, high=i)
        for k in ("loss", "lr", "control_loss"):
            _float(path, f"{f}.{k}", rec[k])
        _int(path, f + ".support", rec["support"], low=0)
        per_layer = _list(path, f + ".per_layer", rec["per_layer"])
        if n_loss is not None and len(per_layer) != n_loss:
            _fail(path, f + ".per_layer", f"{len(per_layer)} values for {n_loss} loss modules")
        for j, v in enumerate(per_layer):
            _float(path, f"{f}.per_layer[{j}]", v)


def _check_optimizer(opt, path: str, shapes: list, step: int) -> None:
    """Optimizer state_dict: one param group over every map (and gate) parameter, per-parameter
    state of the parameter's shape, finite, Adam's step counts within the run."""
    opt = _dict(path, "optimizer", opt)
    groups = _list(path, "optimizer.param_groups", opt.get("param_groups"))
    if len(groups) != 1:
        _fail(path, "optimizer.param_groups", f"{len(groups)} groups, expected 1")
    group = _dict(path, "optimizer.param_groups[0]", groups[0])
    params = _list(path, "optimizer.param_groups[0].params", group.get("params"))
    if params != list(range(len(shapes))):
        _fail(
            path,
            "optimizer.param_groups[0].params",
            f"{len(params)} parameters, expected {len(shapes)} (two per map and per gate)",
        )
    for k in ("lr", "initial_lr"):
        if k in group:
            _float(path, f"optimizer.param_groups[0].{k}", group[k], low=0)
    state = _dict(path, "optimizer.state", opt.get("state"))
    for key, entry in state.items():
        f = f"optimizer.state[{key!r}]"
        idx = _int(path, f, key, low=0, high=len(shapes) - 1)
        entry = _dict(path, f, entry)
        for k, v in entry.items():
            if k == "step":
                t = _tensor(path, f"{f}.step", v, shape=())
                if not 0 <= float(t) <= step:
                    _fail(path, f"{f}.step", f"{float(t)} is outside [0, {step}]")
            elif k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                if v is None and k == "momentum_buffer":
                    continue
                _tensor(path, f"{f}.{k}", v, shape=shapes[idx], nonnegative=k != "exp_avg")
            else:
                _fail(path, f"{f}.{k}", "unknown optimizer state entry")


SCHEDULER_KEYS = {"base_lrs", "last_epoch", "_step_count", "_last_lr", "lr_lambdas", "verbose"}
SCHEDULER_FLAGS = {"_is_initial", "_get_lr_called_within_step", "verbose"}


def _check_scheduler(sched, path: str, step: int) -> None:
    """LambdaLR state_dict: only its own keys (``load_state_dict`` copies every key onto the
    scheduler), ``last_epoch`` = step, one finite base and last learning rate, no lambda state."""
    sched = _dict(path, "scheduler", sched)
    unknown = sorted(k for k in sched if k not in SCHEDULER_KEYS | SCHEDULER_FLAGS)
    if unknown:
        _fail(path, f"scheduler.{unknown[0]}", "not a key of the learning-rate scheduler's state")
    _int(path, "scheduler.last_epoch", sched.get("last_epoch"), low=step, high=step)
    _int(path, "scheduler._step_count", sched.get("_step_count"), low=0)
    for key in ("base_lrs", "_last_lr"):
        if key in sched or key == "base_lrs":
            values = _list(path, f"scheduler.{key}", sched.get(key))
            if len(values) != 1:
                _fail(path, f"scheduler.{key}", f"{len(values)} values, expected 1")
            _float(path, f"scheduler.{key}[0]", values[0], low=0)
    if sched.get("lr_lambdas", [None]) != [None]:
        _fail(path, "scheduler.lr_lambdas", f"expected [None], got {str(sched['lr_lambdas'])[:60]}")
    for key in SCHEDULER_FLAGS & set(sched):
        if not isinstance(sched[key], bool) and sched[key] is not None:
            _fail(path, f"scheduler.{key}", f"expected a bool, got {type(sched[key]).__name__}")


def check_against_run(state: dict, path: str, maps: dict, gates: dict, opt, sched) -> None:
    """The checked state fits the run's built maps, gates, optimizer and scheduler (shapes, the
    optimizer's and scheduler's keys and fixed settings), before any of them is changed."""
    for m, (om, _) in maps.items():
        saved = tuple(state["maps"][m][0].shape)
        if saved != tuple(om.shape):
            _fail(path, f"maps[{m!r}]", f"shape {saved}, expected {tuple(om.shape)}")
    if set(state["gates"]) != set(gates):
        _fail(path, "gates", f"gates at {sorted(state['gates'])[:3]}, this run gates {sorted(gates)[:3]}")
    have = opt.state_dict()["param_groups"][0]
    saved = state["optimizer"]["param_groups"][0]
    if set(saved) != set(have):
        _fail(path, "optimizer.param_groups[0]", f"keys {sorted(saved)}, expected {sorted(have)}")
    fixed = [k for k in have if k not in ("lr", "params", "initial_lr") and saved[k] != have[k]]
    if fixed:
        k = fixed[0]
        _fail(path, f"optimizer.param_groups[0].{k}", f"{saved[k]!r}, expected {have[k]!r}")
    missing = sorted(set(sched.state_dict()) - set(state["scheduler"]) - SCHEDULER_FLAGS)
    if missing:
        _fail(path, "scheduler", f"keys {missing} missing")
