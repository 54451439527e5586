"""LinEAS training (SPEC §4): all maps jointly, proximal SGD/Adam with cosine decay."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .checks import choice, integer, number
from .io import atomic_path, file_kind
from .kernels._backend import use_triton
from .modules import coordinate_dim
from .steering import Steering
from .targets import Target, as_target, check_texts
from .wasserstein import REDUCTIONS, TargetProfile, pack_profiles, sliced_wasserstein


class TrainingDivergedError(RuntimeError):
    """The loss or the trained maps became NaN or Inf; no Steering is returned and the last
    checkpoint (of a good step) is left as it was."""


@dataclass
class TrainConfig:
    modules: str = ".*post.*layernorm"
    loss_modules: Optional[str] = None
    steps: int = 1000
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: Optional[float] = None
    reduction: str = "reference"
    sparsity: float = 0.0
    l1: float = 1.0
    group: float = 1.0
    seed: int = 0
    max_length: int = 128
    init: Optional[str] = None
    autocast_dtype: Optional[str] = None
    gate: Optional[str] = None
    gate_kind: str = "sigmoid"
    control_weight: float = 1.0

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 0.1 if self.optimizer == "sgd" else 1e-2

    def check(self) -> None:
        """Every setting in range and finite; the error names the argument and the value."""
        choice(self.optimizer, "optimizer", ("sgd", "adam"))
        choice(self.reduction, "reduction", REDUCTIONS)
        integer(self.steps, "steps", low=0)
        integer(self.batch_size, "batch_size", low=1)
        integer(self.seed, "seed")
        integer(self.max_length, "max_length", low=1)
        if self.lr is not None:
            number(self.lr, "lr", low=0, low_open=True)
        for name in ("sparsity", "l1", "group", "control_weight"):
            number(getattr(self, name), name, low=0)
        choice(self.init, "init", (None, "linear_act"))
        choice(self.gate, "gate", (None, "e2e"))
        choice(self.gate_kind, "gate_kind", ("sigmoid", "relu"))


@dataclass
class StepRecord:
    step: int
    loss: float
    per_layer: list = field(default_factory=list)
    support: int = 0
    lr: float = 0.0
    control_loss: float = 0.0


def cosine_factor(step: int, steps: int, floor: float = 1e-3) -> float:
    """Learning-rate multiplier: cosine from 1 at step 0 to ``floor`` at the last step."""
    if steps <= 1:
        return 1.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / (steps - 1)))


@torch.no_grad()
def proximal_step(v: torch.Tensor, tau: float, sparsity: float, l1: float, group: float) -> None:
    """Sparse group lasso prox in place on v (d,): soft-threshold by τγλ₁, then shrink the
    group by max(0, 1 − τγλ_G√d/‖v‖)."""
    if sparsity <= 0:
        return
    t = tau * sparsity * l1
    if t > 0:
        v.copy_(torch.sign(v) * (v.abs() - t).clamp_min(0))
    g = tau * sparsity * group * math.sqrt(v.numel())
    if g > 0:
        norm = v.norm()
        v.mul_((1 - g / norm).clamp_min(0) if norm > 0 else 0.0)


def train(model, tokenizer, source: Sequence[str], target: Sequence[str],
          modules: str = ".*post.*layernorm", steps: int = 1000, *,
          loss_modules: str | None = None, batch_size: int = 32, optimizer: str = "sgd",
          lr: float | None = None, reduction: str = "reference", sparsity: float = 0.0,
          l1: float = 1.0, group: float = 1.0, seed: int = 0, max_length: int = 128,
          init: str | Steering | None = None, autocast_dtype: torch.dtype | None = None,
          checkpoint_every: int = 0, checkpoint_path: str | None = None,
          resume_from: str | None = None, callback: Callable[[StepRecord], None] | None = None,
          progress: bool = True, backend: str | None = None, gate: str | None = None,
          gate_kind: str = "sigmoid", control: Sequence[str] | None = None,
          control_weight: float = 1.0, timestep: int | None = None,
          resolution: int | None = None) -> Steering:
    """Train LinEAS maps at ``modules`` so the steered source matches the target at
    ``loss_modules`` (default: the same modules).

    Model weights are frozen (no weight gradients), the forward stops after the last loss
    module, batches are length-bucketed, targets are computed once as profiles. Returns a
    ``Steering`` whose ``metadata["history"]`` holds per-step loss, per-layer loss and support.

    Checkpointing: every ``checkpoint_every`` steps the maps and optimizer, scheduler and RNG
    state are written atomically to ``checkpoint_path``; ``resume_from`` continues such a run
    to the same result as an uninterrupted one. A NaN/Inf loss raises TrainingDivergedError
    (the last checkpoint is left untouched).

    End-to-end DSAS (``gate="e2e"``): a gate g = σ(w·z + c) (``gate_kind="relu"``: clamp to
    [0, 1]) per module is trained with the maps; the loss adds ``control_weight`` × the mean
    squared difference between steered and unsteered pooled activations of ``control``
    sentences, so the gate learns to stay shut on neutral text.

    ``model`` is a causal LM (with its ``tokenizer``), a diffusers StableDiffusion(XL) pipeline
    (``tokenizer`` None: source and target are prompts; modules are regexes over ``unet.…``
    names; activations are pooled per image at denoising ``timestep``, default the first
    sampling step, at latent ``resolution``, default the UNet's sample size), or a
    ``lineas_fast.targets.Target`` built once with ``as_target`` (its settings then apply).
    """
    cfg = TrainConfig(modules=modules, loss_modules=loss_modules, steps=steps,
                      batch_size=batch_size, optimizer=optimizer, lr=lr, reduction=reduction,
                      sparsity=sparsity, l1=l1, group=group, seed=seed, max_length=max_length,
                      init=init if isinstance(init, str) else None,
                      autocast_dtype=str(autocast_dtype) if autocast_dtype else None,
                      gate=gate, gate_kind=gate_kind, control_weight=control_weight)
    cfg.check()
    if checkpoint_every and not checkpoint_path:
        raise ValueError("checkpoint_every needs checkpoint_path")
    steered = as_target(model, tokenizer, max_length=max_length, autocast_dtype=autocast_dtype,
                        timestep=timestep, seed=seed, resolution=resolution)
    words = " prompts" if steered.kind == "pipeline" else ""
    source, target = check_texts(source, "source" + words), check_texts(target, "target" + words)
    if control is not None:          # lists now: a generator would be spent before its digest
        control = check_texts(control, "control" + words)
    names = steered.match(modules, "modules")
    loss_names = steered.match(loss_modules, "loss_modules") if loss_modules else names
    steered.require(names + loss_names)
    if not isinstance(init, (str, Steering, type(None))):
        raise TypeError(f"init must be None, 'linear_act' or a Steering, got {type(init).__name__}")
    if isinstance(init, Steering):
        given = steered.resolve(init)
        absent = [m for m in names if m not in given]
        if absent:
            raise ValueError(f"init steering has no map for module {absent[0]!r} "
                             f"({len(absent)} of the {len(names)} modules missing)")
        given.validate(steered, strict=False)
    use_triton(steered.device, backend)            # an unknown or unavailable backend fails now
    src, tgt = steered.encode(source, "source"), steered.encode(target, "target")
    n = min(batch_size, steered.count(src))
    if cfg.gate == "e2e" and not control:
        raise ValueError("gate='e2e' needs control sentences (control=[...])")
    ctrl = steered.encode(control, "control") if cfg.gate == "e2e" else None
    _check_loss_after_maps(steered, src, names, loss_names)
    _check_checkpoint_path(checkpoint_path)
    identity = (_run_identity(steered, source, target, control if ctrl is not None else None)
                if checkpoint_path or resume_from else None)
    resumed = _load_checkpoint(resume_from, cfg, identity, names) if resume_from else None

    with steered.frozen(), _SaveOnSignal(checkpoint_path) as stop:
        with torch.no_grad():
            tgt_acts = steered.pooled(tgt, loss_names, stop=True)
            ctrl_ref = steered.pooled(ctrl, loss_names, stop=True) if ctrl is not None else None
        profiles = pack_profiles([TargetProfile(tgt_acts[m], n) for m in loss_names])
        start = _initial_maps(steered, source, target, names, init, cfg, src)
        gates = _initial_gates(start, cfg) if cfg.gate else {}
        params = [t for pair in start.values() for t in pair]
        params += [g[k] for g in gates.values() for k in ("w", "c")]
        opt = (torch.optim.SGD(params, lr=cfg.resolved_lr()) if cfg.optimizer == "sgd"
               else torch.optim.Adam(params, lr=cfg.resolved_lr()))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, cfg.steps))
        gen = torch.Generator().manual_seed(cfg.seed)
        history: list[StepRecord] = []
        first = 0
        if resumed is not None:
            first, history = _restore_checkpoint(resumed, start, gates, opt, sched, gen)
        steering = Steering(start, gates=gates)
        n_src, n_ctrl = steered.count(src), (steered.count(ctrl) if ctrl is not None else 0)
        bar = _progress(range(first, cfg.steps), progress, first, cfg.steps)
        stop.arm(lambda done: _save_checkpoint(checkpoint_path, done, cfg, identity, start, gates,
                                               opt, sched, gen, history))
        for step in bar:
            idx = torch.randperm(n_src, generator=gen)[:n].tolist()
            tau = opt.param_groups[0]["lr"]
            with steering.attach(steered, strict=False, backend=backend):
                acts = steered.pooled(src, loss_names, idx, stop=True)
            dev = profiles.mean.device
            loss, per_layer = sliced_wasserstein([acts[m].to(dev) for m in loss_names], profiles,
                                                 cfg.reduction, return_per_layer=True,
                                                 backend=backend)
            control_loss = torch.zeros((), device=loss.device)
            if ctrl_ref is not None:
                cidx = torch.randperm(n_ctrl, generator=gen)[:n].tolist()
                with steering.attach(steered, strict=False, backend=backend):
                    cacts = steered.pooled(ctrl, loss_names, cidx, stop=True)
                control_loss = torch.stack([((cacts[m].to(dev) - ctrl_ref[m][cidx].to(dev)) ** 2).mean()
                                            for m in loss_names]).mean()
                loss = loss + cfg.control_weight * control_loss
            if not torch.isfinite(loss):
                bad = [m for m, v in zip(loss_names, per_layer.tolist()) if not math.isfinite(v)]
                where = f"; last checkpoint: {checkpoint_path}" if checkpoint_path else ""
                raise TrainingDivergedError(
                    f"loss is {loss.item()} at step {step} (non-finite at {bad[:5]}); lower the "
                    f"learning rate or use autocast_dtype=None{where}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for omega, bias in start.values():
                with torch.no_grad():
                    v = omega - 1
                    proximal_step(v, tau, cfg.sparsity, cfg.l1, cfg.group)
                    omega.copy_(v + 1)
                    proximal_step(bias, tau, cfg.sparsity, cfg.l1, cfg.group)
            sched.step()
            rec = StepRecord(step, loss.item(), per_layer.tolist(), steering.support(), tau,
                             control_loss.item())
            history.append(rec)
            if progress:
                bar.set_postfix(loss=f"{rec.loss:.4g}", support=rec.support)
            if callback:
                callback(rec)
            if checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps):
                stop.save(step + 1)
            stop.check(step + 1)             # SIGINT/SIGTERM: checkpoint, then act on the signal
    _check_finite(start, gates, len(history), checkpoint_path)
    result = steering.detach()
    result.metadata = {"model": steered.fingerprint(), "method": "lineas",
                       "hyperparameters": asdict(cfg), "history": [asdict(r) for r in history]}
    return result


def _check_loss_after_maps(steered: Target, src, names: list[str], loss_names: list[str]) -> None:
    """A loss module that runs before every steered module cannot be moved by the maps: its
    loss is a constant and training would silently do nothing there."""
    if loss_names == names:
        return
    order = steered.execution_order(src, list(dict.fromkeys(names + loss_names)))
    first_map = min(order.index(n) for n in names)
    early = [m for m in loss_names if m not in names and order.index(m) < first_map]
    if early:
        raise ValueError(f"loss_modules {early[:5]} run before the first steered module "
                         f"{order[first_map]!r}: the maps cannot change them; choose loss "
                         f"modules at or after the steered ones")


def _initial_gates(maps, cfg) -> dict:
    """Gate parameters per module: w = 0 and c giving g = 0.5 (sigmoid: c = 0; relu: c = 0.5,
    inside the clamp so the gate has a gradient)."""
    c0 = 0.0 if cfg.gate_kind == "sigmoid" else 0.5
    return {m: {"w": torch.zeros_like(om).requires_grad_(),
                "c": torch.full((1,), c0, device=om.device).requires_grad_(), "kind": cfg.gate_kind}
            for m, (om, _) in maps.items()}


def _initial_maps(target: Target, source, target_texts, names, init, cfg, src):
    """Leaf (ω, b) float32 per module on its parameters' device: identity, Linear-AcT or a
    given Steering."""
    if isinstance(init, Steering):
        given = target.resolve(init)
    elif init == "linear_act":
        from .linear_act import fit_linear_act
        given = fit_linear_act(target, None, source, target_texts, cfg.modules)
    else:
        given = None
    maps = {}
    for m in names:
        dev = target.module_device(m)
        if given is not None:
            if m not in given:
                raise ValueError(f"init steering has no map for module {m!r}")
            om, b = given[m]
        else:
            d = coordinate_dim(target.named[m])
            if d is None:
                with torch.no_grad():
                    d = target.pooled(src, [m], idx=[0], stop=True)[m].shape[1]
            om, b = torch.ones(d), torch.zeros(d)
        maps[m] = (om.detach().float().to(dev).clone().requires_grad_(),
                   b.detach().float().to(dev).clone().requires_grad_())
    return maps


def _progress(it, enabled, first, total):
    from tqdm.auto import tqdm
    return tqdm(it, disable=not enabled, initial=first, total=total, desc="lineas", leave=False)


# --- checkpoints, resumption and signals -------------------------------------------------------
CHECKPOINT_FORMAT = "lineas_fast.checkpoint"
CHECKPOINT_VERSION = 1


def _check_checkpoint_path(path) -> None:
    """A checkpoint_path that can never be written fails before any work is spent."""
    if path is None:
        return
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint_path {path!r} is a folder; give a file name such as "
                                f"{os.path.join(path, 'checkpoint.pt')!r}")
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


def _run_identity(steered: Target, source, target, control) -> dict:
    """What a checkpoint must match to be resumed: the model (``steered.fingerprint()`` and a
    sample of its weights), the data (sha256 of each sentence or prompt list) and how the
    activations are read (truncation, autocast, diffusion timestep, noise seed, resolution)."""
    reading = {"kind": steered.kind}
    for key in ("max_length", "autocast_dtype", "timestep", "seed", "res"):
        if hasattr(steered, key):
            value = getattr(steered, key)
            reading[key] = value if isinstance(value, (int, float, str, type(None))) else str(value)
    return {"model": {**steered.fingerprint(), "weights_sample_sha256": _weights_sample(steered.root)},
            "data": {"source": _texts_digest(source), "target": _texts_digest(target),
                     "control": _texts_digest(control)},
            "reading": reading}


def _check_finite(maps, gates, done: int, path) -> None:
    """Trained maps (and gates) must be finite: a NaN/Inf map is never returned or saved."""
    def finite(*ts):
        return all(bool(torch.isfinite(t.detach()).all()) for t in ts)
    bad = [m for m, (om, b) in maps.items() if not finite(om, b)]
    bad += [f"{m} (gate)" for m, g in gates.items() if not finite(g["w"], g["c"])]
    if bad:
        kept = f"; the last checkpoint {os.fspath(path)!r} is left as it was" if path else ""
        raise TrainingDivergedError(
            f"the trained maps are not finite (NaN or Inf) after step {done} at {len(bad)} "
            f"module(s): {bad[:5]}; lower the learning rate or use autocast_dtype=None{kept}")


def _save_checkpoint(path, step, cfg, identity, maps, gates, opt, sched, gen, history):
    """Maps, gates, optimizer, scheduler and RNG state after ``step`` steps, with what the run
    must match to be resumed; written atomically (the old checkpoint stays until the new one is
    complete). Non-finite maps are refused (TrainingDivergedError), the old checkpoint kept."""
    from ._version import __version__
    _check_finite(maps, gates, step, path)
    state = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
             "library_version": __version__, "step": step, "config": asdict(cfg), **identity,
             "maps": {m: (om.detach().cpu(), b.detach().cpu()) for m, (om, b) in maps.items()},
             "gates": {m: (g["w"].detach().cpu(), g["c"].detach().cpu()) for m, g in gates.items()},
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "generator": gen.get_state(), "history": [asdict(r) for r in history]}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _what_it_is(path: str) -> str:
    """A hint on what a file that is not a checkpoint looks like."""
    return {"empty": "the file is empty",
            "safetensors": "it is a safetensors file, e.g. a steering written by Steering.save; "
                           "resume_from takes the file train wrote to checkpoint_path",
            }.get(file_kind(path), "")


def _differences(state: dict, cfg: TrainConfig, identity: dict, names: list[str]) -> list[str]:
    diffs = []
    was, now = state.get("config", {}), asdict(cfg)
    for k in dict.fromkeys([*now, *was]):
        if was.get(k) != now.get(k):
            diffs.append(f"setting {k}: saved {was.get(k)!r}, now {now.get(k)!r}")
    sm, nm = state.get("model") or {}, identity["model"]
    labels = {"model_type": "model_type", "shapes_sha256": "parameter names/shapes (sha256)",
              "weights_sample_sha256": "weights sample (sha256; other weights or dtype)"}
    parts = [f"{label} saved {sm.get(k)!r}, now {nm.get(k)!r}" for k, label in labels.items()
             if sm.get(k) != nm.get(k)]
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
            continue                                     # the same value, listed as a setting
        if saved_reading.get(k) != identity["reading"].get(k):
            diffs.append(f"reading {k}: saved {saved_reading.get(k)!r}, now "
                         f"{identity['reading'].get(k)!r}")
    saved_mods = list(state.get("maps") or {})
    if set(saved_mods) != set(names):
        extra, missing = sorted(set(saved_mods) - set(names)), sorted(set(names) - set(saved_mods))
        diffs.append(f"modules: {len(saved_mods)} saved, {len(names)} now (only saved: "
                     f"{extra[:3]}, only now: {missing[:3]})")
    return diffs


def _load_checkpoint(path, cfg: TrainConfig, identity: dict, names: list[str]) -> dict:
    """Read and check a checkpoint before any training work: a missing file, a file that is
    not a lineas_fast checkpoint, or one written for another model, other data or other
    settings is refused with every difference listed."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} (resume_from) does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"resume_from {path!r} is a folder; give the checkpoint file "
                                f"written to checkpoint_path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                   # noqa: BLE001 (any unreadable file)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        hint = _what_it_is(path)
        raise ValueError(f"{path!r} is not a lineas_fast training checkpoint "
                         f"({hint + '; ' if hint else ''}torch.load failed: "
                         f"{type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        hint = _what_it_is(path) or (f"no {CHECKPOINT_FORMAT!r} marker: another kind of file, "
                                     f"or a checkpoint from an older lineas_fast")
        raise ValueError(f"{path!r} is not a lineas_fast training checkpoint ({hint})")
    if state.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path!r} was written by a newer lineas_fast "
                         f"({state.get('library_version')}); upgrade to resume it")
    missing = [k for k in ("step", "maps", "gates", "optimizer", "scheduler", "generator",
                           "history") if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path!r} is damaged: {missing} missing")
    diffs = _differences(state, cfg, identity, names)
    if diffs:
        raise ValueError(f"cannot resume from {path!r}: it was written with other settings, "
                         f"model or data ({len(diffs)} difference(s)):\n  - " + "\n  - ".join(diffs))
    return state


def _restore_checkpoint(state, maps, gates, opt, sched, gen):
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
    history = [StepRecord(**r) for r in state["history"]]
    return int(state["step"]), history


class _SaveOnSignal:
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
        signal.raise_signal(signum)              # the previous handler (or default action) runs
        if signum == signal.SIGINT:              # it returned: training stops anyway
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def __exit__(self, *exc) -> bool:
        pending, self.pending, self.armed = self.pending, None, False
        self._restore()
        if pending is not None:
            self._act(pending)
        return False
