"""Training checkpoints: what a run writes every ``checkpoint_every`` steps and on SIGINT/SIGTERM,
what it must match to be resumed (model, data, settings), and the signal handling that saves
before acting on the signal."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import threading
from dataclasses import asdict

import torch

from lineas_fast._version import __version__
from lineas_fast.atomic import atomic_path, file_kind, name_too_long
from lineas_fast.training.checkpoint_checks import (
    CheckpointError,
    check_against_run,
    check_archive,
    check_state,
)


class TrainingDivergedError(RuntimeError):
    """The loss or the trained maps became NaN or Inf; no Steering is returned and the last
    checkpoint (of a good step) is left as it was."""


CHECKPOINT_FORMAT = "lineas_fast.checkpoint"
CHECKPOINT_VERSION = 1


def check_checkpoint_path(path) -> None:
    """A checkpoint_path that can never be written fails before any work is spent."""
    if path is None:
        return
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"checkpoint_path {path!r} is a folder; give a file name such as "
            f"{os.path.join(path, 'checkpoint.pt')!r}"
        )
    too_long = name_too_long(path)
    if too_long:
        raise OSError(errno.ENAMETOOLONG, f"checkpoint_path {path!r} cannot be written: {too_long}")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"checkpoint_path {path!r}: {folder!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"checkpoint_path {path!r}: no permission to write in {folder!r}")


def _texts_digest(texts) -> dict | None:
    if texts is None:
        return None
    texts = [str(t) for t in texts]
    return {"count": len(texts), "sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest()}


@torch.no_grad()
def _weights_sample(root) -> str:
    """sha256 over every parameter's name and first 64 values (float32): tells a fine-tuned or
    otherwise different model of the same architecture apart, at the cost of tiny copies."""
    h = hashlib.sha256()
    for name, p in root.named_parameters():
        if p.is_meta:
            continue
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def run_identity(steered, source, target, control) -> dict:
    """What a checkpoint must match to be resumed: the model (``steered.fingerprint()`` and a
    sample of its weights), the data (sha256 of each sentence or prompt list) and how the
    activations are read (truncation, autocast, diffusion timestep, noise seed, resolution,
    noise shared per step; the last only where it is on, so checkpoints of the other targets
    and of ``shared_noise=False`` runs read as before)."""
    reading = {"kind": steered.kind}
    for key in ("max_length", "autocast_dtype", "timestep", "seed", "res"):
        if hasattr(steered, key):
            value = getattr(steered, key)
            reading[key] = value if isinstance(value, (int, float, str, type(None))) else str(value)
    if getattr(steered, "shared_noise", False):
        reading["shared_noise"] = True
    return {
        "model": {**steered.fingerprint(), "weights_sample_sha256": _weights_sample(steered.root)},
        "data": {
            "source": _texts_digest(source),
            "target": _texts_digest(target),
            "control": _texts_digest(control),
        },
        "reading": reading,
    }


def check_finite(maps, gates, done: int, path) -> None:
    """Trained maps (and gates) must be finite: a NaN/Inf map is never returned or saved."""

    def finite(*ts):
        return all(bool(torch.isfinite(t.detach()).all()) for t in ts)

    bad = [m for m, (om, b) in maps.items() if not finite(om, b)]
    bad += [f"{m} (gate)" for m, g in gates.items() if not finite(g["w"], g["c"])]
    if bad:
        kept = f"; the last checkpoint {os.fspath(path)!r} is left as it was" if path else ""
        raise TrainingDivergedError(
            f"the trained maps are not finite (NaN or Inf) after step {done} at {len(bad)} "
            f"module(s): {bad[:5]}; lower the learning rate or use autocast_dtype=None{kept}"
        )


def save_checkpoint(path, step, cfg, identity, maps, gates, opt, sched, gen, history):
    """Maps, gates, optimizer, scheduler and RNG state after ``step`` steps, with what the run
    must match to be resumed; written atomically (the old checkpoint stays until the new one is
    complete). Non-finite maps are refused (TrainingDivergedError), the old checkpoint kept."""

    check_finite(maps, gates, step, path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "library_version": __version__,
        "step": step,
        "config": asdict(cfg),
        **identity,
        "maps": {m: (om.detach().cpu(), b.detach().cpu()) for m, (om, b) in maps.items()},
        "gates": {m: (g["w"].detach().cpu(), g["c"].detach().cpu()) for m, g in gates.items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "history": [asdict(r) for r in history],
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # a file object, not the name: torch.save refuses a file name without a suffix after
        # its leading dot (a temporary of a checkpoint named "ckpt")
        torch.save(state, f)


def _what_it_is(path: str) -> str:
    """A hint on what a file that is not a checkpoint looks like."""
    return {
        "empty": "the file is empty",
        "safetensors": "it is a safetensors file, e.g. a steering written by Steering.save; "
        "resume_from takes the file train wrote to checkpoint_path",
    }.get(file_kind(path), "")


def _differences(state: dict, cfg, identity: dict, names: list[str]) -> list[str]:
    diffs = []
    was, now = state.get("config", {}), asdict(cfg)
    for k in dict.fromkeys([*now, *was]):
        if was.get(k) != now.get(k):
            diffs.append(f"setting {k}: saved {was.get(k)!r}, now {now.get(k)!r}")
    sm, nm = state.get("model") or {}, identity["model"]
    labels = {
        "model_type": "model_type",
        "shapes_sha256": "parameter names/shapes (sha256)",
        "weights_sample_sha256": "weights sample (sha256; other weights or dtype)",
    }
    parts = [
        f"{label} saved {sm.get(k)!r}, now {nm.get(k)!r}"
        for k, label in labels.items()
        if sm.get(k) != nm.get(k)
    ]
    if parts:
        names_or_paths = (sm.get("name_or_path") or "", nm.get("name_or_path") or "")
        where = f" (saved {names_or_paths[0]!r}, now {names_or_paths[1]!r})" if any(names_or_paths) else ""
        diffs.append(f"model{where}: " + "; ".join(parts))
    what = "prompts" if identity["reading"].get("kind") == "pipeline" else "sentences"
    saved_data = state.get("data") or {}
    for role, digest in identity["data"].items():
        old = saved_data.get(role)
        if old != digest:

            def show(d):
                return "none" if d is None else f"{d['count']} (sha256 {d['sha256'][:12]})"

            diffs.append(f"{role} {what}: saved {show(old)}, now {show(digest)}")
    saved_reading = state.get("reading") or {}
    for k in dict.fromkeys([*identity["reading"], *saved_reading]):
        if any(d.startswith(f"setting {k}:") for d in diffs):
            continue  # the same value, listed as a setting
        if saved_reading.get(k) != identity["reading"].get(k):
            diffs.append(f"reading {k}: saved {saved_reading.get(k)!r}, now {identity['reading'].get(k)!r}")
    saved_mods = list(state.get("maps") or {})
    if set(saved_mods) != set(names):
        extra, missing = sorted(set(saved_mods) - set(names)), sorted(set(names) - set(saved_mods))
        diffs.append(
            f"modules: {len(saved_mods)} saved, {len(names)} now (only saved: "
            f"{extra[:3]}, only now: {missing[:3]})"
        )
    return diffs


_handed_over: dict = {}  # {file identity: state} read by read_checkpoint(keep=True), taken once


def _identity(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_checkpoint(path, keep: bool = False) -> dict:
    """A checkpoint file's contents, read once and bounded: the zip archive's directory is
    checked first (``check_archive``: no compressed entry, sizes within the file), then
    ``torch.load(weights_only=True)``, then the format marker and the required fields. With
    ``keep=True`` (the CLI's early check) the state is kept for the next ``read_checkpoint`` of
    the same unchanged file (same inode, size and mtime), which takes it instead of loading the
    file a second time. CheckpointError (a ValueError) naming the file otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} (resume_from) does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"resume_from {path!r} is a folder; give the checkpoint file written to checkpoint_path"
        )
    key = _identity(path)
    if key in _handed_over:
        state = _handed_over.pop(key)
    else:
        _handed_over.clear()
        state = _load(path)
    if keep:
        _handed_over[key] = state
    return state


def _load(path: str) -> dict:
    hint = _what_it_is(path)
    if hint:
        raise CheckpointError(f"{path!r} is not a lineas_fast training checkpoint ({hint})")
    check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"{path!r} is not a lineas_fast training checkpoint "
            f"(torch.load failed: {type(e).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path!r} is not a lineas_fast training checkpoint (no {CHECKPOINT_FORMAT!r} marker: "
            f"another kind of file, or a checkpoint from an older lineas_fast)"
        )
    version = state.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} was written by a newer lineas_fast "
            f"({str(state.get('library_version'))[:40]}); upgrade to resume it"
        )
    missing = [
        k
        for k in ("step", "maps", "gates", "optimizer", "scheduler", "generator", "history")
        if k not in state
    ]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is damaged: {missing} missing")
    for key in ("config", "model", "data", "reading", "maps", "gates"):
        if (state.get(key) is not None or key in ("maps", "gates")) and not isinstance(state[key], dict):
            raise CheckpointError(
                f"checkpoint {path!r} is damaged: {key}: expected an object (dict), got "
                f"{type(state[key]).__name__} {str(state[key])[:60]!r}"
            )
    for role, digest in (state.get("data") or {}).items():
        if digest is not None and not (
            isinstance(digest, dict)
            and isinstance(digest.get("count"), int)
            and isinstance(digest.get("sha256"), str)
        ):
            raise CheckpointError(
                f"checkpoint {path!r} is damaged: data.{role}: expected an object with 'count' and "
                f"'sha256', got {type(digest).__name__} {str(digest)[:60]!r}"
            )
    return state


def load_checkpoint(path, cfg, identity: dict, names: list[str], dims=None, n_loss=None) -> dict:
    """Read and check a checkpoint before any training work: a missing file, a file that is
    not a lineas_fast checkpoint, or one written for another model, other data or other
    settings is refused with every difference listed; then every field is checked as untrusted
    input (``check_state``: the step within ``cfg.steps``, the maps' shapes against ``dims``
    {module: coordinates or None}, optimizer, scheduler and RNG state, history with ``n_loss``
    per-layer losses). CheckpointError (a ValueError) naming the file and the field."""
    path = os.fspath(path)
    state = read_checkpoint(path)
    diffs = _differences(state, cfg, identity, names)
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path!r}: it was written with other settings, "
            f"model or data ({len(diffs)} difference(s)):\n  - " + "\n  - ".join(diffs)
        )
    check_state(
        state,
        path,
        cfg.steps,
        names,
        dict(dims or {}),
        bool(cfg.gate),
        n_loss,
    )
    return state


def restore_checkpoint(state, maps, gates, opt, sched, gen, path="checkpoint"):
    """Copy a checked checkpoint into the run's maps, gates, optimizer, scheduler and generator,
    after checking it fits them (``check_against_run``); returns (step, history records)."""
    check_against_run(state, os.fspath(path), maps, gates, opt, sched)
    with torch.no_grad():
        for m, (om, b) in maps.items():
            om.copy_(state["maps"][m][0])
            b.copy_(state["maps"][m][1])
        for m, g in gates.items():
            g["w"].copy_(state["gates"][m][0])
            g["c"].copy_(state["gates"][m][1])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return int(state["step"]), list(state["history"])


class SaveOnSignal:
    """SIGINT / SIGTERM while ``train`` runs its loop with a ``checkpoint_path``: the step under
    way finishes, a checkpoint is written, then the signal is acted on as it would have been
    without ``train`` (by default: KeyboardInterrupt for Ctrl-C, termination for SIGTERM). A
    second signal, or one before the loop starts, acts at once. Installed only in the main
    thread and only for this block; the previous handlers are restored after; ignored signals
    stay ignored."""

    def __init__(self, path):
        self.path, self.previous = path, {}
        self.pending, self.armed, self.saver, self.saved = None, False, None, None

    def __enter__(self):
        if self.path is not None and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(signum)
                if handler in (signal.SIG_IGN, None):
                    continue
                self.previous[signum] = handler
                signal.signal(signum, self._handler)
        return self

    def arm(self, saver) -> None:
        self.saver, self.armed = saver, bool(self.previous)

    def save(self, done: int) -> None:
        if self.saver is not None and self.saved != done:
            self.saver(done)
            self.saved = done

    def check(self, done: int) -> None:
        if self.pending is not None:
            signum, self.pending = self.pending, None
            self.armed = False
            self.save(done)
            self._act(signum)

    def _handler(self, signum, frame) -> None:
        if self.armed and self.pending is None:
            self.pending = signum
            return
        self._act(signum)

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _act(self, signum) -> None:
        self.armed = False
        self._restore()
        signal.raise_signal(signum)  # the previous handler (or default action) runs
        if signum == signal.SIGINT:  # it returned: training stops anyway
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def __exit__(self, *exc) -> bool:
        pending, self.pending, self.armed = self.pending, None, False
        self._restore()
        if pending is not None:
            self._act(pending)
        return False
