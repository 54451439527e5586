"""LinEAS training (SPEC §4): all maps jointly, proximal SGD/Adam with cosine decay.

``train`` runs a ``Trainer`` to its last step. After the first, a step does no device→host
synchronisation: the step's loss, per-layer losses, control loss and support stay on the device
and are read every ``read_every`` steps, before each checkpoint and at the end (that is where a
NaN/Inf loss is noticed); the maps are attached once for the whole run; the proximal step and
the support count are a few ``torch._foreach_*`` ops over all modules (none at sparsity 0).
A ``callback`` asks for each step's record as the step ends: one read per step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from lineas_fast.checks import ArgumentError, choice, integer, number
from lineas_fast.kernels._backend import use_triton
from lineas_fast.modules import coordinate_dim
from lineas_fast.steering import Steering
from lineas_fast.targets import Target, as_target, check_texts
from lineas_fast.training.checkpoints import (
    SaveOnSignal,
    TrainingDivergedError,  # noqa: F401
    check_checkpoint_path,
    check_finite,
    load_checkpoint,
    restore_checkpoint,
    run_identity,
    save_checkpoint,
)
from lineas_fast.training.distributed import (
    DEFAULT_RENDEZVOUS_TIMEOUT,
    DEFAULT_TIMEOUT,
    agreed,
    describe,
    settings_digest,
    shard_model,
)
from lineas_fast.training.distributed import setup as setup_ranks
from lineas_fast.training.linear_act import fit_per_module, linear_act_map
from lineas_fast.wasserstein import REDUCTIONS, TargetProfile, pack_profiles, sliced_wasserstein


@dataclass
class TrainConfig:
    modules: str = ".*post.*layernorm"
    loss_modules: Optional[str] = None
    steps: int = 1000
    batch_size: int = 32
    optimizer: str = "adam"
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
        return 0.1 if self.optimizer == "sgd" else 3e-3

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
def proximal_step(vs: Sequence[torch.Tensor], tau: float, sparsity: float, l1: float, group: float) -> None:
    """Sparse group lasso prox in place on each v (d_i,) of ``vs`` (one device): soft-threshold
    by τγλ₁, then shrink each group by max(0, 1 − τγλ_G√d_i/‖v‖). Branch-free ``_foreach``
    ops: no host synchronisation, the same number of launches for 1 or 100 modules."""
    vs = list(vs)
    if sparsity <= 0 or not vs:
        return
    t = tau * sparsity * l1
    if t > 0:
        mags = torch._foreach_abs(vs)
        torch._foreach_sub_(mags, t)
        torch._foreach_clamp_min_(mags, 0.0)
        torch._foreach_mul_(mags, torch._foreach_sign(vs))
        torch._foreach_copy_(vs, mags)
    g = tau * sparsity * group
    if g > 0:
        shrink = torch._foreach_reciprocal(torch._foreach_norm(vs))
        torch._foreach_mul_(shrink, [g * math.sqrt(v.numel()) for v in vs])
        torch._foreach_neg_(shrink)  # 1 − τγλ_G√d/‖v‖, then max(0, ·):
        torch._foreach_add_(shrink, 1.0)  # ‖v‖ = 0 gives 1 − inf → 0 (v is 0)
        torch._foreach_clamp_min_(shrink, 0.0)
        torch._foreach_mul_(vs, shrink)


def _by_device(maps):
    """{device: [(ω, b), ...]} so each ``_foreach`` call sees tensors of one device."""
    out: dict = {}
    for om, b in maps:
        out.setdefault(om.device, []).append((om, b))
    return out


@torch.no_grad()
def proximal_maps(maps, tau: float, sparsity: float, l1: float, group: float) -> None:
    """``proximal_step`` on every map's ω − 1 and b, in place (no-op at sparsity 0)."""
    if sparsity <= 0:
        return
    for pairs in _by_device(maps).values():
        omegas = [om for om, _ in pairs]
        vs = torch._foreach_sub(omegas, 1.0)
        proximal_step(vs, tau, sparsity, l1, group)
        torch._foreach_add_(vs, 1.0)
        torch._foreach_copy_(omegas, vs)
        proximal_step([b for _, b in pairs], tau, sparsity, l1, group)


@torch.no_grad()
def support_count(maps, device) -> torch.Tensor:
    """Coordinates whose map is not the identity (ω ≠ 1 or b ≠ 0), summed over all maps, as a
    float32 0-d tensor on ``device`` (no host synchronisation)."""
    parts = []
    for pairs in _by_device(maps).values():
        off = torch._foreach_sub([om for om, _ in pairs], 1.0)
        torch._foreach_abs_(off)
        torch._foreach_add_(off, torch._foreach_abs([b for _, b in pairs]))
        counts = torch._foreach_norm(off, 0)  # nonzeros per map
        parts.append(torch.stack(counts).sum().float().to(device, non_blocking=True))
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


class Trainer:
    """One LinEAS training run, step by step; ``train(...)`` is ``Trainer(...).run()``.

    Construction checks every argument, encodes the sentences (or prompts) and reads a
    checkpoint to resume, before any model compute. Entering the ``with`` block freezes the
    model, reads the target (and control) activations once, builds the maps, optimizer and
    schedule, and attaches the maps for the whole run; leaving it removes them. A target with
    ``shared_noise`` (a diffusers pipeline, by default) instead has its target activations read
    every step, with the maps off, on the step's fresh noise, shared by the step's source and
    target samples (``_shared_noise_batch``)::

        with lf.Trainer(model, tok, source, target, steps=200) as run:
            while not run.finished:
                run.step()
        steering = run.result()

    ``step()`` does no device→host synchronisation after the first step (records are read by
    ``read_records()``: every ``read_every`` steps, before a checkpoint, at the end, and after
    every step when a ``callback`` is given). Arguments: as for ``train``.

    Several processes (``lineas_fast.training.distributed``): under torchrun, or inside an
    initialised process group, each rank reads its share of every batch and of the targets, the
    pooled activations are gathered so the loss is the exact W2 of the global batch, and the map
    gradients are summed over the ranks: every rank trains the maps of the single-process run
    (SGD: equal to float rounding; Adam: see docs/distributed.md). ``distributed`` (None:
    detect; False: one process; True: require a group), ``fsdp`` (shard the frozen model's
    decoder layers with FSDP2), ``timeout`` (seconds a collective waits) and
    ``rendezvous_timeout`` (seconds every rank has to arrive), the last two when the group is
    created here. The ranks check they hold the same model before the first step. Rank 0 alone
    writes checkpoints and shows progress.
    """

    def __init__(
        self,
        model,
        tokenizer,
        source: Sequence[str],
        target: Sequence[str],
        modules: str = ".*post.*layernorm",
        steps: int = 1000,
        *,
        loss_modules: str | None = None,
        batch_size: int = 32,
        optimizer: str = "adam",
        lr: float | None = None,
        reduction: str = "reference",
        sparsity: float = 0.0,
        l1: float = 1.0,
        group: float = 1.0,
        seed: int = 0,
        max_length: int = 128,
        init: str | Steering | None = None,
        autocast_dtype: torch.dtype | None = None,
        checkpoint_every: int = 0,
        checkpoint_path: str | None = None,
        resume_from: str | None = None,
        callback: Callable[[StepRecord], None] | None = None,
        progress: bool = True,
        backend: str | None = None,
        gate: str | None = None,
        gate_kind: str = "sigmoid",
        control: Sequence[str] | None = None,
        control_weight: float = 1.0,
        timestep: int | None = None,
        resolution: int | None = None,
        read_every: int = 20,
        distributed: bool | None = None,
        fsdp: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT,
    ):
        args = {
            k: v
            for k, v in locals().items()
            if k not in ("self", "distributed", "fsdp", "timeout", "rendezvous_timeout")
        }
        # several processes (torchrun): every rank checks the same arguments and its model, then
        # they agree (before FSDP moves any weight: a rank on the meta device is not compared)
        self.ranks = setup_ranks(distributed, timeout, fsdp, rendezvous_timeout)
        with agreed(self.ranks) as agreement:
            self._prepare(**args)
            agreement.digest = self._digest()
            agreement.model = self.target.root
        if self.ranks is not None and self.ranks.fsdp:
            shard_model(self.target)

    def _prepare(
        self, *, model, tokenizer, source, target, modules, steps, loss_modules, batch_size, optimizer, lr,
        reduction, sparsity, l1, group, seed, max_length, init, autocast_dtype, checkpoint_every,
        checkpoint_path, resume_from, callback, progress, backend, gate, gate_kind, control,
        control_weight, timestep, resolution, read_every,
    ) -> None:  # fmt: skip
        """Check every argument, encode the sentences, read the checkpoint to resume."""
        cfg = TrainConfig(
            modules=modules,
            loss_modules=loss_modules,
            steps=steps,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            reduction=reduction,
            sparsity=sparsity,
            l1=l1,
            group=group,
            seed=seed,
            max_length=max_length,
            init=init if isinstance(init, str) else None,
            autocast_dtype=str(autocast_dtype) if autocast_dtype else None,
            gate=gate,
            gate_kind=gate_kind,
            control_weight=control_weight,
        )
        cfg.check()
        integer(read_every, "read_every", low=1)
        integer(checkpoint_every, "checkpoint_every", low=0)
        if checkpoint_every and not checkpoint_path:
            raise ValueError("checkpoint_every needs checkpoint_path")
        steered = as_target(
            model,
            tokenizer,
            max_length=max_length,
            autocast_dtype=autocast_dtype,
            timestep=timestep,
            seed=seed,
            resolution=resolution,
        )
        words = " prompts" if steered.kind == "pipeline" else ""
        source = check_texts(source, "source" + words)
        target = check_texts(target, "target" + words)
        if control is not None:  # lists now: a generator would be spent before its digest
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
                raise ValueError(
                    f"init steering has no map for module {absent[0]!r} "
                    f"({len(absent)} of the {len(names)} modules missing)"
                )
            given.validate(steered, strict=False)
        use_triton(steered.device, backend)  # an unknown or unavailable backend fails now
        if cfg.gate == "e2e" and not control:
            raise ValueError("gate='e2e' needs control sentences (control=[...])")
        self.src, self.tgt = steered.encode(source, "source"), steered.encode(target, "target")
        self.ctrl = steered.encode(control, "control") if cfg.gate == "e2e" else None
        _check_loss_after_maps(steered, self.src, names, loss_names)
        check_checkpoint_path(checkpoint_path)
        self.identity = (
            run_identity(steered, source, target, control if self.ctrl is not None else None)
            if checkpoint_path or resume_from
            else None
        )
        self.resume_from = resume_from
        self.resumed = (
            load_checkpoint(
                resume_from,
                cfg,
                self.identity,
                names,
                dims={m: coordinate_dim(steered.named[m]) for m in names},
                n_loss=len(loss_names),
            )
            if resume_from
            else None
        )
        self.cfg, self.target, self.names, self.loss_names = cfg, steered, names, loss_names
        self.texts = (source, target)
        self.init, self.backend, self.callback = init, backend, callback
        self.progress, self.read_every = progress, int(read_every)
        self.checkpoint_every, self.checkpoint_path = int(checkpoint_every), checkpoint_path
        self.n = min(batch_size, steered.count(self.src))
        if self.ranks is not None:
            if steered.shared_noise:
                raise ArgumentError(
                    "training a diffusers pipeline with shared noise over several processes is not "
                    "supported; run it in one process",
                    "distributed",
                )
            noun = "prompt" if steered.kind == "pipeline" else "sentence"
            n_src = steered.count(self.src)
            # the batch is min(batch_size, source count): name whichever the user gave that is short
            counts = [("batch_size", batch_size, "")] if batch_size <= n_src else []
            counts.append(("source", n_src, f"source {noun}"))
            counts.append(("target", steered.count(self.tgt), f"target {noun}"))
            if self.ctrl is not None:
                counts.append(("control", steered.count(self.ctrl), f"control {noun}"))
            self.ranks.check_counts(*counts)
        self.done = 0  # steps completed
        self.history: list[StepRecord] = []
        self._pending: list = []  # (step, lr, record tensor on the device) not yet read
        self._stack: contextlib.ExitStack | None = None

    def _digest(self) -> str:
        """What every rank must have been given alike (settings, modules, data, resume step)."""
        return settings_digest(
            asdict(self.cfg),
            self.names,
            self.loss_names,
            list(self.texts),
            [self.read_every, self.checkpoint_every, self.resumed["step"] if self.resumed else None],
            self.identity and self.identity["data"],
            self.init if isinstance(self.init, (str, type(None))) else "steering",
        )

    def _read(self, encoded, names, idx=None) -> dict:
        """Pooled activations of the samples ``idx``: read here, or shared out over the ranks
        and gathered (``Ranks.read``), the same rows either way."""
        if self.ranks is None:
            return self.target.pooled(encoded, names, idx, stop=True)
        return self.ranks.read(self.target, encoded, names, idx)

    @property
    def finished(self) -> bool:
        return self.done >= self.cfg.steps

    # --- the run's lifetime ------------------------------------------------------------------
    def __enter__(self) -> "Trainer":
        if self._stack is not None:
            raise RuntimeError("this Trainer is already running (nested `with`)")
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self.target.frozen())
            self.stop = stack.enter_context(SaveOnSignal(self.checkpoint_path))
            self._setup()
            self.handle = stack.enter_context(
                self.steering.attach(self.target, strict=False, backend=self.backend)
            )
            self.stop.arm(self._save)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> bool:
        stack, self._stack = self._stack, None
        return bool(stack.__exit__(*exc)) if stack is not None else False

    def _setup(self) -> None:
        cfg, t, n = self.cfg, self.target, self.n
        with torch.no_grad():
            tgt_acts = None if t.shared_noise else self._read(self.tgt, self.loss_names)
            self.ctrl_ref = self._read(self.ctrl, self.loss_names) if self.ctrl is not None else None
        self.profiles = (
            None
            if tgt_acts is None
            # shared noise: built every step
            else pack_profiles([TargetProfile(tgt_acts[m], n) for m in self.loss_names])
        )
        self.maps = _initial_maps(t, *self.texts, self.names, self.init, cfg, self.src, self.ranks)
        self.gates = _initial_gates(self.maps, cfg) if cfg.gate else {}
        params = [p for pair in self.maps.values() for p in pair]
        params += [g[k] for g in self.gates.values() for k in ("w", "c")]
        self.params = params
        self.opt = (
            torch.optim.SGD(params, lr=cfg.resolved_lr())
            if cfg.optimizer == "sgd"
            else torch.optim.Adam(params, lr=cfg.resolved_lr())
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: cosine_factor(s, cfg.steps))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        if self.resumed is not None:
            self.done, history = restore_checkpoint(
                self.resumed, self.maps, self.gates, self.opt, self.sched, self.gen, self.resume_from
            )
            self.history = [StepRecord(**r) for r in history]
        self.steering = Steering(self.maps, gates=self.gates)
        self.device = t.device if self.profiles is None else self.profiles.mean.device
        self.zero = torch.zeros((), device=self.device)
        self.n_src, self.n_tgt = t.count(self.src), t.count(self.tgt)
        self.n_ctrl = t.count(self.ctrl) if self.ctrl is not None else 0
        self.bar = _progress(self.progress and (self.ranks is None or self.ranks.main), self.done, cfg.steps)

    # --- one step ----------------------------------------------------------------------------
    def step(self) -> None:
        """One proximal optimizer step on a random batch of ``batch_size`` source sentences."""
        if self._stack is None:
            raise RuntimeError("Trainer.step() runs inside `with trainer:` (or use run())")
        if self.finished:
            raise RuntimeError(f"training already ran its {self.cfg.steps} steps")
        cfg, t, dev = self.cfg, self.target, self.device
        step = self.done
        idx = torch.randperm(self.n_src, generator=self.gen)[: self.n].tolist()
        tau = self.opt.param_groups[0]["lr"]
        if t.shared_noise:
            src, profiles = self._shared_noise_batch(idx)
            acts = t.pooled(src, self.loss_names, stop=True)
        else:
            profiles = self.profiles
            acts = self._read(self.src, self.loss_names, idx)
        loss, per_layer = sliced_wasserstein(
            [acts[m].to(dev) for m in self.loss_names],
            profiles,
            cfg.reduction,
            return_per_layer=True,
            backend=self.backend,
        )
        control_loss = self.zero
        if self.ctrl_ref is not None:
            cidx = torch.randperm(self.n_ctrl, generator=self.gen)[: self.n].tolist()
            cacts = self._read(self.ctrl, self.loss_names, cidx)
            control_loss = torch.stack(
                [((cacts[m].to(dev) - self.ctrl_ref[m][cidx].to(dev)) ** 2).mean() for m in self.loss_names]
            ).mean()
            loss = loss + cfg.control_weight * control_loss
        self.opt.zero_grad(set_to_none=True)
        with self.ranks.sharded("backward (FSDP)") if self.ranks is not None else contextlib.nullcontext():
            loss.backward()
        if self.ranks is not None:  # each rank holds its samples' part of the gradient
            self.ranks.reduce_grads(self.params)
        self.opt.step()
        proximal_maps(self.maps.values(), tau, cfg.sparsity, cfg.l1, cfg.group)
        self.sched.step()
        record = torch.cat(
            [
                loss.detach().reshape(1),
                control_loss.detach().reshape(1),
                support_count(self.maps.values(), dev).reshape(1),
                per_layer,
            ]
        )
        self._pending.append((step, tau, record))
        self.done = step + 1
        self.bar.update(1)
        if self.callback is not None or self.done % self.read_every == 0 or self.finished:
            self.read_records()
        if self.checkpoint_every and (self.done % self.checkpoint_every == 0 or self.finished):
            self.stop.save(self.done)
        if self.ranks is None:
            self.stop.check(self.done)  # SIGINT/SIGTERM: checkpoint, then act on the signal
        elif self.done % self.read_every == 0 or self.finished:  # the ranks act on it together
            signum = self.ranks.any_flag(self.stop.pending or 0)
            if signum and self.stop.pending is None:
                self.stop.pending = signum
            self.stop.check(self.done)

    def _shared_noise_batch(self, idx: list[int]):
        """Common random numbers for a ``shared_noise`` target: one fresh noise draw (n, ...)
        from the run's generator (so a resumed run draws the same), the source samples ``idx``
        and n target samples (a random permutation of the targets, cycled when there are fewer
        than n) on it, sample i of both on ``noise[i]``. The target activations are read under
        it with no grad and the maps switched off (the untouched model). Returns the encoded
        source batch and the step's packed target profile."""
        t, n = self.target, len(idx)
        perm = torch.randperm(self.n_tgt, generator=self.gen).tolist()
        tidx = [perm[i % len(perm)] for i in range(n)]
        noise = t.draw_noise(n, self.gen)
        with torch.no_grad(), _maps_off(self.handle):
            ref = t.pooled(t.with_noise(self.tgt, tidx, noise), self.loss_names, stop=True)
        profiles = pack_profiles([TargetProfile(ref[m].to(self.device), n) for m in self.loss_names])
        return t.with_noise(self.src, idx, noise), profiles

    def read_records(self) -> list[StepRecord]:
        """Read the pending steps' records from the device (one synchronisation), append them to
        ``history``, call the callback on each, and raise ``TrainingDivergedError`` at the first
        step whose loss is NaN or Inf. Returns the records read."""
        if not self._pending:
            return []
        values = torch.stack([r for _, _, r in self._pending]).tolist()
        pending, self._pending = self._pending, []
        if self.ranks is not None:
            self.ranks.check_same(self.params, pending[-1][0] + 1)
        out = []
        for (step, tau, _), v in zip(pending, values):
            loss, control, support, per_layer = v[0], v[1], int(v[2]), v[3:]
            if not math.isfinite(loss):
                bad = [m for m, x in zip(self.loss_names, per_layer) if not math.isfinite(x)]
                where = f"; last checkpoint: {self.checkpoint_path}" if self.checkpoint_path else ""
                raise TrainingDivergedError(
                    f"loss is {loss} at step {step} (non-finite at {bad[:5]}); lower the "
                    f"learning rate or use autocast_dtype=None{where}"
                )
            rec = StepRecord(step, loss, per_layer, support, tau, control)
            self.history.append(rec)
            out.append(rec)
            if self.callback is not None:
                self.callback(rec)
        if self.progress and out:
            self.bar.set_postfix(loss=f"{out[-1].loss:.4g}", support=out[-1].support)
        return out

    def _save(self, done: int) -> None:
        """Checkpoint after ``done`` steps (records read first: a diverged run saves nothing)."""
        self.read_records()
        if self.ranks is not None and not self.ranks.main:
            return  # rank 0 alone writes
        save_checkpoint(
            self.checkpoint_path,
            done,
            self.cfg,
            self.identity,
            self.maps,
            self.gates,
            self.opt,
            self.sched,
            self.gen,
            self.history,
        )

    # --- the whole run -----------------------------------------------------------------------
    def run(self) -> Steering:
        """All remaining steps, then ``result()``."""
        with self:
            while not self.finished:
                self.step()
        return self.result()

    def result(self) -> Steering:
        """The trained maps (detached), with ``metadata["history"]`` (one record per step),
        the model's fingerprint and the settings. Non-finite maps raise TrainingDivergedError."""
        self.read_records()
        if hasattr(self, "bar"):
            self.bar.close()
        check_finite(self.maps, self.gates, len(self.history), self.checkpoint_path)
        result = self.steering.detach()
        result.metadata = {
            "model": self.target.fingerprint(),
            "method": "lineas",
            "hyperparameters": asdict(self.cfg),
            "history": [asdict(r) for r in self.history],
            **describe(self.ranks),
        }
        return result


def train(
    model,
    tokenizer,
    source: Sequence[str],
    target: Sequence[str],
    modules: str = ".*post.*layernorm",
    steps: int = 1000,
    **kwargs,
) -> Steering:
    """Train LinEAS maps at ``modules`` so the steered source matches the target at
    ``loss_modules`` (default: the same modules).

    Model weights are frozen (no weight gradients), the forward stops after the last loss
    module, batches are length-bucketed, targets are computed once as profiles (pipelines:
    every step, on noise shared with the source batch; see below). Returns a
    ``Steering`` whose ``metadata["history"]`` holds per-step loss, per-layer loss and support.

    Keyword arguments: loss_modules, batch_size (32), optimizer ("adam" | "sgd"), lr, reduction
    ("reference" | "sum"), sparsity, l1, group (sparse group lasso), seed, max_length, init
    (None | "linear_act" | a Steering), autocast_dtype, checkpoint_every, checkpoint_path,
    resume_from, callback, progress, backend, gate, gate_kind, control, control_weight,
    timestep, resolution, read_every (steps between reads of the records, default 20),
    distributed, fsdp, timeout, rendezvous_timeout (several processes, see ``Trainer`` and
    docs/distributed.md).

    Checkpointing: every ``checkpoint_every`` steps the maps and optimizer, scheduler and RNG
    state are written atomically to ``checkpoint_path``; ``resume_from`` continues such a run
    to the same result as an uninterrupted one. A NaN/Inf loss raises TrainingDivergedError
    when the records are read (the last checkpoint, of a good step, is left untouched).

    End-to-end DSAS (``gate="e2e"``): a gate g = σ(w·z + c) (``gate_kind="relu"``: clamp to
    [0, 1]) per module is trained with the maps; the loss adds ``control_weight`` × the mean
    squared difference between steered and unsteered pooled activations of ``control``
    sentences, so the gate learns to stay shut on neutral text.

    ``model`` is a causal LM (with its ``tokenizer``), a diffusers StableDiffusion(XL) pipeline
    (``tokenizer`` None: source and target are prompts; modules are regexes over ``unet.…``
    names; activations are pooled per image at denoising ``timestep``, default the first
    sampling step, at latent ``resolution``, default the UNet's sample size), or a
    ``lineas_fast.targets.Target`` built once with ``as_target`` (its settings then apply).
    For a pipeline each step draws fresh noise from the run's seeded generator, runs source
    sample i and target sample i on the same noise and reads the step's target activations
    under it (common random numbers: the maps learn what the prompts change, not the noise);
    ``PipelineTarget(pipe, shared_noise=False)`` keeps the target read once on fixed noise.
    A step synchronises with the device only when the records are read (see ``Trainer``).
    """
    return Trainer(model, tokenizer, source, target, modules, steps, **kwargs).run()


@contextlib.contextmanager
def _maps_off(handle):
    """The attached maps as pass-throughs inside (``SteeredForward.active``), on again after."""
    installed = [s for s in handle.installed if s.active]
    for s in installed:
        s.active = False
    try:
        yield
    finally:
        for s in installed:
            s.active = True


def _check_loss_after_maps(steered: Target, src, names: list[str], loss_names: list[str]) -> None:
    """A loss module that runs before every steered module cannot be moved by the maps: its
    loss is a constant and training would silently do nothing there."""
    if loss_names == names:
        return
    order = steered.execution_order(src, list(dict.fromkeys(names + loss_names)))
    first_map = min(order.index(n) for n in names)
    early = [m for m in loss_names if m not in names and order.index(m) < first_map]
    if early:
        raise ArgumentError(
            f"loss_modules {early[:5]} run before the first steered module "
            f"{order[first_map]!r}: the maps cannot change them; choose loss "
            f"modules at or after the steered ones",
            "loss_modules",
        )


def _initial_gates(maps, cfg) -> dict:
    """Gate parameters per module: w = 0 and c giving g = 0.5 (sigmoid: c = 0; relu: c = 0.5,
    inside the clamp so the gate has a gradient)."""
    c0 = 0.0 if cfg.gate_kind == "sigmoid" else 0.5
    return {
        m: {
            "w": torch.zeros_like(om).requires_grad_(),
            "c": torch.full((1,), c0, device=om.device).requires_grad_(),
            "kind": cfg.gate_kind,
        }
        for m, (om, _) in maps.items()
    }


def _initial_maps(target: Target, source, target_texts, names, init, cfg, src, ranks=None):
    """Leaf (ω, b) float32 per module on its parameters' device: identity, Linear-AcT or a
    given Steering."""
    if isinstance(init, Steering):
        given = target.resolve(init)
    elif init == "linear_act":
        given = fit_per_module(
            target, None, source, target_texts, cfg.modules, linear_act_map, "linear_act", ranks=ranks
        )
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
        maps[m] = (
            om.detach().float().to(dev).clone().requires_grad_(),
            b.detach().float().to(dev).clone().requires_grad_(),
        )
    return maps


def _progress(enabled, first, total):

    return tqdm(disable=not enabled, initial=first, total=total, desc="lineas", leave=False)
