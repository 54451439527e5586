"""LinEAS training (SPEC §4): all maps jointly, proximal SGD/Adam with cosine decay."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .checks import choice, integer, number
from .io import atomic_path
from .kernels._backend import use_triton
from .modules import coordinate_dim
from .steering import Steering
from .targets import Target, as_target
from .wasserstein import REDUCTIONS, TargetProfile, pack_profiles, sliced_wasserstein


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the maps of the last good step are kept."""


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

    with steered.frozen():
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
        if resume_from:
            first, history = _load_checkpoint(resume_from, cfg, start, gates, opt, sched, gen)
        steering = Steering(start, gates=gates)
        n_src, n_ctrl = steered.count(src), (steered.count(ctrl) if ctrl is not None else 0)
        bar = _progress(range(first, cfg.steps), progress, first, cfg.steps)
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
                _save_checkpoint(checkpoint_path, step + 1, cfg, start, gates, opt, sched, gen,
                                 history)
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


def _save_checkpoint(path, step, cfg, maps, gates, opt, sched, gen, history):
    state = {"step": step, "config": asdict(cfg),
             "maps": {m: (om.detach().cpu(), b.detach().cpu()) for m, (om, b) in maps.items()},
             "gates": {m: (g["w"].detach().cpu(), g["c"].detach().cpu()) for m, g in gates.items()},
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "generator": gen.get_state(), "history": [asdict(r) for r in history]}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path, cfg, maps, gates, opt, sched, gen):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"checkpoint {path!r} was written with other settings "
                         f"(saved, now): {diff}")
    if set(state["maps"]) != set(maps):
        raise ValueError(f"checkpoint {path!r} holds maps for other modules")
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
